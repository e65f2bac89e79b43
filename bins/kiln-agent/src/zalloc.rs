//! The agent's global allocator: the system allocator, but every block is zeroed when it is
//! freed (or moved by `realloc`).
//!
//! Why: the agent handles secret values (delivery over stdin, exec environments). glibc's
//! `free` keeps a block's bytes until the block is reused, so a value would outlive its use
//! in the agent's heap and end up in a user snapshot's memory file. With this allocator, and
//! the guest kernel's `init_on_free=1` for memory returned to the kernel, freed memory holds
//! zeros. Cost: one `memset` per free, small next to the copies the agent already makes.

#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};

/// [`System`], zeroing on free.
pub struct ZeroOnFree;

// SAFETY: every method forwards to `System` with the caller's layout; `dealloc` only writes
// within the block being freed, which the caller owns until the call returns.
unsafe impl GlobalAlloc for ZeroOnFree {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` is a live block of `layout.size()` bytes owned by the caller.
        unsafe {
            std::ptr::write_bytes(ptr, 0, layout.size());
            // Stores right before `free` are dead to the optimizer, which would drop the
            // memset; an opaque use of the block keeps it.
            std::hint::black_box(ptr);
            System.dealloc(ptr, layout);
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Not forwarded: the system realloc may move the block and free the old one unzeroed.
        // SAFETY: `layout` with `new_size` is valid per the GlobalAlloc contract.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: forwarded contract.
        let new = unsafe { System.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are live and distinct; copy the smaller size.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_and_moved_blocks_are_zeroed_and_contents_kept() {
        let a = ZeroOnFree;
        let layout = Layout::from_size_align(64, 8).expect("layout");
        // SAFETY: blocks are used within their sizes and freed once.
        unsafe {
            let p = a.alloc(layout);
            assert!(!p.is_null());
            std::ptr::write_bytes(p, 0xAB, 64);
            let q = a.realloc(p, layout, 4096);
            assert!(!q.is_null());
            assert!((0..64).all(|i| *q.add(i) == 0xAB), "contents moved");
            a.dealloc(q, Layout::from_size_align(4096, 8).expect("layout"));
        }
    }
}
