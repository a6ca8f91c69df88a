//! Heap buffers aligned to [`ALIGN`] bytes, their allocation rounded up to a
//! whole number of it and the tail zeroed: what a read with `O_DIRECT` can
//! write into. Packed weight matrices keep their values in these, so that an
//! expert read from a packed expert file lands in the buffers the kernels
//! read, with no copy in between.

use std::alloc::{Layout, alloc_zeroed, dealloc, handle_alloc_error};
use std::ptr::NonNull;

use half::{bf16, f16};

/// Alignment of address and length: the page size, which covers the logical
/// block size any `O_DIRECT` file system asks for.
pub const ALIGN: usize = 4096;

/// `n` rounded up to a multiple of [`ALIGN`].
pub const fn align_up(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// Values that every bit pattern of their size is a valid instance of, with
/// no padding: their buffers may be filled from a file's bytes.
///
/// # Safety
/// Implement only for such types.
pub unsafe trait Plain: Copy + Send + Sync + 'static {}

// SAFETY: integers and IEEE floats have no invalid bit patterns and no padding.
unsafe impl Plain for u8 {}
// SAFETY: as above.
unsafe impl Plain for f16 {}
// SAFETY: as above.
unsafe impl Plain for bf16 {}
// SAFETY: as above.
unsafe impl Plain for f32 {}

/// A fixed-length `[T]` in an [`ALIGN`]-aligned allocation of
/// `align_up(len * size_of::<T>())` bytes, all zero at first.
pub struct AlignedVec<T: Plain> {
    ptr: NonNull<T>,
    len: usize,
}

// SAFETY: the buffer is owned, like a Vec's; `T: Plain` is Send and Sync.
unsafe impl<T: Plain> Send for AlignedVec<T> {}
// SAFETY: as above; shared access is read-only.
unsafe impl<T: Plain> Sync for AlignedVec<T> {}

impl<T: Plain> AlignedVec<T> {
    /// `len` zero values.
    pub fn zeroed(len: usize) -> Self {
        const { assert!(std::mem::align_of::<T>() <= ALIGN) };
        let bytes = Self::padded_len_of(len);
        if bytes == 0 {
            return Self {
                ptr: NonNull::dangling(),
                len,
            };
        }
        let layout = Self::layout(bytes);
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw.cast::<T>()) else {
            handle_alloc_error(layout)
        };
        Self { ptr, len }
    }

    /// Bytes the allocation of a buffer of `len` values spans.
    pub fn padded_len_of(len: usize) -> usize {
        align_up(len * std::mem::size_of::<T>())
    }

    fn layout(bytes: usize) -> Layout {
        Layout::from_size_align(bytes, ALIGN).expect("an aligned buffer's size overflows isize")
    }

    /// The whole allocation as bytes, the zeroed tail included.
    pub fn padded_bytes(&self) -> &[u8] {
        let n = Self::padded_len_of(self.len);
        // SAFETY: the allocation spans `n` initialised bytes (zeroed, then
        // written only through `T`s or these bytes).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<u8>(), n) }
    }

    /// The same, writable: every bit pattern is a valid `T` (`Plain`).
    pub fn padded_bytes_mut(&mut self) -> &mut [u8] {
        let n = Self::padded_len_of(self.len);
        // SAFETY: as in `padded_bytes`, and `&mut self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().cast::<u8>(), n) }
    }
}

impl<T: Plain> std::ops::Deref for AlignedVec<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        // SAFETY: `len` initialised values (or a dangling, aligned pointer for
        // an empty buffer).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Plain> std::ops::DerefMut for AlignedVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and `&mut self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Plain> Clone for AlignedVec<T> {
    fn clone(&self) -> Self {
        let mut copy = Self::zeroed(self.len);
        copy.padded_bytes_mut().copy_from_slice(self.padded_bytes());
        copy
    }
}

impl<T: Plain> Drop for AlignedVec<T> {
    fn drop(&mut self) {
        let bytes = Self::padded_len_of(self.len);
        if bytes > 0 {
            // SAFETY: allocated in `zeroed` with this layout.
            unsafe { dealloc(self.ptr.as_ptr().cast::<u8>(), Self::layout(bytes)) };
        }
    }
}

impl<T: Plain + std::fmt::Debug> std::fmt::Debug for AlignedVec<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedVec(len {})", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_padded_and_zeroed() {
        let mut v = AlignedVec::<f16>::zeroed(3000);
        assert_eq!(v.as_ptr() as usize % ALIGN, 0);
        assert_eq!(v.len(), 3000);
        assert_eq!(v.padded_bytes().len(), 8192);
        assert!(v.padded_bytes().iter().all(|&b| b == 0));
        v[2999] = f16::ONE;
        let c = v.clone();
        assert_eq!(c[2999], f16::ONE);
        assert_eq!(&c.padded_bytes()[5998..6000], &f16::ONE.to_le_bytes());
        let empty = AlignedVec::<u8>::zeroed(0);
        assert!(empty.is_empty() && empty.padded_bytes().is_empty());
    }
}
