//! Fallible allocation of the buffers whose sizes come from an image's
//! config: the run state and the KV cache. A size that overflows, or that the
//! allocator cannot provide, is an [`ErrorKind::OutOfMemory`] error naming the
//! buffer, never a wrapped small size or an abort.

use crate::error::{Error, ErrorKind, Result};

/// The product of `factors`, or an error naming `what` when it overflows.
pub fn checked_size(what: &str, factors: &[usize]) -> Result<usize> {
    factors.iter().try_fold(1usize, |product, &factor| product.checked_mul(factor)).ok_or_else(|| {
        let shown: Vec<String> = factors.iter().map(usize::to_string).collect();
        Error::new(ErrorKind::OutOfMemory, format!("{what}: {} elements overflow", shown.join(" × ")))
    })
}

/// `len` copies of `value`, or an error naming `what` when the operating
/// system cannot provide them.
///
/// The buffer is made by `vec!`, which for zeros takes zeroed pages from the
/// operating system and leaves them untouched until they are used (so that
/// `brambled` checks its memory limit before the state is resident); filling
/// a vector reserved with `try_reserve_exact` would write every page. So the
/// same number of bytes is first mapped, as a probe the operating system may
/// refuse, and unmapped before `vec!` asks for it. The probe is an anonymous
/// map rather than a malloc: freeing a large malloc block raises glibc's
/// mmap threshold, after which the next buffers come from the heap and are
/// cleared page by page.
pub fn filled<T: Clone>(what: &str, len: usize, value: T) -> Result<Vec<T>> {
    let bytes = len as u128 * std::mem::size_of::<T>() as u128;
    let refused = |why: String| {
        Error::new(ErrorKind::OutOfMemory, format!("{what}: {len} elements ({bytes} bytes) cannot be allocated: {why}"))
    };
    // A Vec holds at most isize::MAX bytes.
    if bytes > isize::MAX as u128 {
        return Err(refused("more than the address space holds".to_string()));
    }
    if bytes > 0 {
        drop(memmap2::MmapMut::map_anon(bytes as usize).map_err(|e| refused(e.to_string()))?);
    }
    Ok(vec![value; len])
}

/// [`filled`] with `len` the product of `factors` ([`checked_size`]).
pub fn filled_product<T: Clone>(what: &str, factors: &[usize], value: T) -> Result<Vec<T>> {
    filled(what, checked_size(what, factors)?, value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overflowing_size_is_an_error_naming_the_buffer() {
        let error = checked_size("keys", &[1 << 40, 1 << 30]).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::OutOfMemory);
        assert!(error.message().contains("keys") && error.message().contains("overflow"), "{error}");
        assert_eq!(checked_size("keys", &[3, 5, 7]).unwrap(), 105);
        assert_eq!(checked_size("nothing", &[]).unwrap(), 1);
    }

    #[test]
    fn an_impossible_allocation_is_an_error_not_an_abort() {
        // Above isize::MAX bytes: no allocator can provide it.
        let error = filled("values", usize::MAX / 4, 0f32).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::OutOfMemory);
        assert!(error.message().contains("values") && error.message().contains("cannot be allocated"), "{error}");
        let error = filled_product("keys", &[1 << 31, 1 << 31, 2], 0u8).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::OutOfMemory);
        assert_eq!(filled_product("small", &[2, 3], 1.5f32).unwrap(), vec![1.5; 6]);
    }
}
