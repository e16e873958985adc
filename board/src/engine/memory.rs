//! The `memory_limit` check: what serving the model takes in memory, weighed
//! against the limit after the session is made and before its state's pages
//! are first written, so a model that does not fit is refused with the
//! arithmetic instead of being killed for memory mid-reply.

use crate::config::gib;
use bramble_runtime::kv::KvMode;
use bramble_runtime::session::Session;

/// What the model takes in memory, for the `memory_limit` check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct MemoryNeed {
    /// The image file, mapped (its pages are resident once read).
    pub(super) image_bytes: u64,
    /// The session's state: KV cache and run buffers.
    pub(super) state_bytes: u64,
    /// The KV cache alone (part of `state_bytes`).
    pub(super) kv_bytes: u64,
}

/// What serving takes in memory: the image file of `image_bytes`, mapped,
/// and `session`'s state as the runtime counts it (`RunState::bytes_for`,
/// the count `bramble plan`, `flash` and `bench` use: KV cache, run
/// buffers, R-Sparse scratch). The session's pages are not touched yet.
pub(super) fn memory_needed(image_bytes: u64, session: &Session<'_>) -> MemoryNeed {
    MemoryNeed { image_bytes, state_bytes: session.state_bytes() as u64, kv_bytes: session.kv_bytes() as u64 }
}

impl MemoryNeed {
    /// The whole: the image and the state.
    pub(super) fn total(&self) -> u64 {
        self.image_bytes + self.state_bytes
    }

    /// `Ok` without a limit or within it; over it, the refusal. `limit` is
    /// the resolved `memory_limit` and what set it; `context` and `kv` are
    /// named in the refusal, as the settings to change.
    pub(super) fn check(&self, limit: Option<&(u64, String)>, context: usize, kv: KvMode) -> Result<(), String> {
        match limit {
            Some((limit, why)) if self.total() > *limit => Err(self.refusal(*limit, why, context, kv)),
            _ => Ok(()),
        }
    }

    /// The refusal, with the arithmetic and what to change.
    fn refusal(&self, limit: u64, why: &str, context: usize, kv: KvMode) -> String {
        format!(
            "the model does not fit: {:.2} GiB weights + {:.2} GiB KV cache (context {context}, kv {kv}) + {:.2} GiB \
             buffers = {:.2} GiB > {:.2} GiB ({why}); set a smaller context, {}a smaller model, or memory_limit",
            gib(self.image_bytes),
            gib(self.kv_bytes),
            gib(self.state_bytes - self.kv_bytes),
            gib(self.total()),
            gib(limit),
            if kv == KvMode::Q4 { "" } else { "kv = \"q4\", " },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn a_model_over_the_limit_is_refused_with_the_arithmetic() {
        let need = MemoryNeed { image_bytes: 2 * GIB, state_bytes: GIB, kv_bytes: GIB * 3 / 4 };
        assert_eq!(need.total(), 3 * GIB);
        assert_eq!(need.check(None, 4096, KvMode::F32), Ok(()), "no limit");
        let fits = (3 * GIB, "memory_limit".to_string());
        assert_eq!(need.check(Some(&fits), 4096, KvMode::F32), Ok(()), "exactly at the limit fits");
        let limit = (3 * GIB - 1, "memory_limit".to_string());
        let refusal = need.check(Some(&limit), 4096, KvMode::F32).unwrap_err();
        assert!(
            refusal.starts_with(
                "the model does not fit: 2.00 GiB weights + 0.75 GiB KV cache (context 4096, kv f32) + 0.25 GiB \
                 buffers = 3.00 GiB > 3.00 GiB (memory_limit)"
            ),
            "{refusal}"
        );
        assert!(refusal.contains("kv = \"q4\""), "a smaller KV cache is suggested: {refusal}");
        let refusal = need.check(Some(&limit), 4096, KvMode::Q4).unwrap_err();
        assert!(!refusal.contains("kv = \"q4\""), "the cache is q4 already: {refusal}");
    }
}
