//! The bias feedback on the inference thread: the image's bias section loaded
//! as the configuration asks, the loop run after each response, and the status
//! `/bias` and the console report.

use crate::config::{BiasConfig, Feedback};
use bramble_runtime::bias::{BiasConstraint, FeedbackLoop, FeedbackSnapshot, LoopSignal, ProjectionStats, SECTION};
use bramble_runtime::model::Model;
use bramble_runtime::ModelImage;
use std::path::PathBuf;
use std::sync::Mutex;

/// The bias feedback as `/bias` reports it; the inference thread updates it after each response.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BiasStatus {
    /// `off`, `static` or `adaptive` (`auto` resolved).
    pub mode: &'static str,
    /// The loop's weights, signals and limits, and how it reads a response
    /// (`signal`: the section's `spread`, `mean-lean` or `pronoun-share`);
    /// all empty or zero when off.
    pub feedback: FeedbackSnapshot,
    /// Where the state persists, if it does.
    pub state: Option<PathBuf>,
}

impl BiasStatus {
    /// The status before the model is loaded, and when the feedback is off.
    pub fn off() -> Self {
        Self { mode: "off", ..Self::default() }
    }

    /// `/bias`'s JSON.
    pub fn json(&self) -> serde_json::Value {
        let feedback = &self.feedback;
        serde_json::json!({
            "feedback": self.mode,
            "weights": feedback.weights,
            "predefined_weights": feedback.predefined,
            "recent_signals": feedback.recent,
            "responses": feedback.responses,
            "target": feedback.target,
            "hard_limit": feedback.hard_limit,
            "signal": feedback.signal,
            "share_deviation": feedback.share_deviation,
            "centre_shift": feedback.centre_shift,
            "lean": feedback.lean,
            "state": self.state.as_ref().map(|p| p.display().to_string()),
        })
    }

    /// The console's few lines.
    pub fn text(&self) -> String {
        let list = |v: &[f32], signed: bool| {
            v.iter().map(|x| if signed { format!("{x:+.2}") } else { format!("{x:.2}") }).collect::<Vec<_>>().join(" ")
        };
        let feedback = &self.feedback;
        let mut text = format!("bias feedback: {}", self.mode);
        if self.mode == "off" {
            text.push_str(
                " (feedback off, no bias section, or, under auto, a calibration that did not pass the bias gates: \
                 the log says which)\n",
            );
            return text;
        }
        let pronoun_share = feedback.signal == LoopSignal::PronounShare.name();
        text.push_str(&format!(
            ", {} responses, {} signal, target {:.3}",
            feedback.responses, feedback.signal, feedback.target
        ));
        if pronoun_share {
            // Never regenerated: an answer about a woman is rightly all "she".
            text.push_str(", no hard limit");
        } else {
            text.push_str(&format!(", hard limit {:.3}", feedback.hard_limit));
        }
        if let Some(state) = &self.state {
            text.push_str(&format!(", state {}", state.display()));
        }
        text.push_str(&format!(
            "\nweights ({} layers): {}\npredefined weights:  {}\n",
            feedback.weights.len(),
            list(&feedback.weights, false),
            list(&feedback.predefined, false)
        ));
        if feedback.recent.is_empty() {
            text.push_str("recent signals: none yet\n");
        } else {
            text.push_str(&format!("recent signals (oldest first): {}\n", list(&feedback.recent, true)));
        }
        if pronoun_share {
            text.push_str(&format!(
                "running she-share {:.3} (share deviation {:+.3}); centre moved {:+.3} spreads (+: toward he); ",
                0.5 + feedback.share_deviation,
                feedback.share_deviation,
                feedback.centre_shift
            ));
        }
        text.push_str(&format!("last lean from the centre {:+.3}\n", feedback.lean));
        text
    }
}

/// Applies the bias configuration to `model`: the image's bias section
/// read unless the feedback is off, `auto` resolved against its calibration
/// gates, the section loaded into the model, and the loop (restored from the
/// state file for `adaptive`). Returns the resolved mode and its loop, or
/// `None` when off (logging why, for `auto`).
pub(super) fn load_bias(
    model: &mut Model<'_>,
    image: &ModelImage,
    bias: &BiasConfig,
) -> Result<Option<(Feedback, FeedbackLoop)>, String> {
    let path = image.path().display();
    if bias.feedback == Feedback::Off {
        return Ok(None);
    }
    let serve_off = |reason: &str, has_section: bool| {
        let message = format!(
            "serving with the bias loop off: {reason}; {path} is served without it (--feedback static|adaptive turns it on)"
        );
        // A calibrated image served without its constraint is worth a warning.
        if has_section {
            log::warn!("{message}");
        } else {
            log::info!("{message}");
        }
        if let Some(state) = &bias.state {
            log::warn!("bias.state {}: unused, the feedback is off", state.display());
        }
    };
    let section = match image.section(SECTION).map(BiasConstraint::from_section) {
        None => None,
        Some(Ok(section)) => Some(section),
        // `auto` uses the section only if it is usable.
        Some(Err(e)) if bias.feedback == Feedback::Auto => {
            serve_off(&format!("the image's bias section cannot be read: {e}"), true);
            return Ok(None);
        }
        Some(Err(e)) => return Err(format!("{path}: bias section: {e}")),
    };
    let mode = match bias.feedback.resolve(section.as_ref()) {
        (_, Some(reason)) => {
            serve_off(&reason, section.is_some());
            return Ok(None);
        }
        (Feedback::Off, None) => return Ok(None),
        (mode, None) => mode,
    };
    let Some(section) = section else {
        return Err(format!(
            "bias.feedback {mode}: {path} has no bias section; write one with `bramble bias-calibrate`, or use auto or off"
        ));
    };
    model.set_bias(Some(section)).map_err(|e| format!("{path}: bias section: {e}"))?;
    let constraint = model.bias().ok_or_else(|| format!("{path}: the bias section did not load"))?;
    let mut feedback = FeedbackLoop::new(constraint);
    if let Some(limit) = bias.hard_limit {
        feedback = feedback.with_hard_limit(limit);
    }
    if mode == Feedback::Adaptive {
        if let Some(state) = &bias.state {
            match feedback.restore(state) {
                Ok(true) => {
                    log::info!("bias state restored from {} ({} responses)", state.display(), feedback.responses)
                }
                Ok(false) => log::info!("bias state {}: none yet, starting from the image's weights", state.display()),
                Err(e) => return Err(format!("bias.state: {e}")),
            }
        }
    }
    let why = if bias.feedback == Feedback::Auto { " (auto: the calibration passed every bias gate)" } else { "" };
    log::info!(
        "bias feedback {} over {} layers, {} signal{why}",
        mode.name(),
        feedback.weights.len(),
        feedback.signal.name()
    );
    Ok(Some((mode, feedback)))
}

/// The inference thread's bias feedback.
pub(super) struct BiasFeedback {
    /// `Static` or `Adaptive`.
    mode: Feedback,
    pub(super) feedback: FeedbackLoop,
    /// Regenerations allowed per request.
    pub(super) regenerate: usize,
    /// The state file (adaptive only).
    state: Option<PathBuf>,
}

impl BiasFeedback {
    /// The feedback `load_bias` resolved to `mode`, with the settings of
    /// `config`, and its first status.
    pub(super) fn new(mode: Feedback, feedback: FeedbackLoop, config: &BiasConfig) -> (Self, BiasStatus) {
        let state = config.state.clone().filter(|_| mode == Feedback::Adaptive);
        let status = BiasStatus { mode: mode.name(), feedback: feedback.snapshot(), state: state.clone() };
        (Self { mode, feedback, regenerate: config.regenerate, state }, status)
    }

    /// After a response whose projections `projections` holds and whose
    /// generated tokens are `answer`: its signal; under `adaptive` the
    /// weights adjusted and the state saved; `status` brought up to date.
    pub(super) fn after_response(
        &mut self,
        projections: &ProjectionStats,
        constraint: &BiasConstraint,
        answer: &[u32],
        status: &Mutex<BiasStatus>,
    ) -> f32 {
        let feedback = &mut self.feedback;
        let signal = match self.mode {
            Feedback::Adaptive => {
                let signal = feedback.after_response(projections, constraint, answer);
                if let Some(state) = &self.state {
                    if let Err(e) = feedback.save(state) {
                        log::error!("bias.state: cannot save: {e}");
                    }
                }
                signal
            }
            // Static: the signal is reported and remembered; the weights stay.
            _ => feedback.observe(projections, constraint, answer),
        };
        if feedback.exceeds_hard_limit(signal) {
            log::warn!("bias signal {signal:+.3} is over the hard limit {:+.3}", feedback.hard_limit);
        }
        feedback.update_snapshot(&mut status.lock().unwrap_or_else(|e| e.into_inner()).feedback);
        signal
    }
}
