//! For tests: the most heap a closure held at once on its thread, counted by the test binary's
//! allocator (the system's, wrapped). Other threads' allocations are not counted.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
};

struct Counting;

thread_local! {
    /// Bytes this thread holds now, and the most it held since the last reset.
    static HELD: Cell<(isize, isize)> = const { Cell::new((0, 0)) };
}

fn add(bytes: isize) {
    // `try_with`: a thread's last frees come after its locals are gone.
    let _ = HELD.try_with(|held| {
        let (now, peak) = held.get();
        let now = now + bytes;
        held.set((now, peak.max(now)));
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        add(layout.size() as isize);
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        add(-(layout.size() as isize));
        System.dealloc(ptr, layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        add(layout.size() as isize);
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        add(new_size as isize - layout.size() as isize);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// `work`'s result, and the most bytes it held at once beyond what its thread held before.
pub fn peak<R>(work: impl FnOnce() -> R) -> (R, usize) {
    let before = HELD.with(|held| {
        let (now, _) = held.get();
        held.set((now, now));
        now
    });
    let result = work();
    let peak = HELD.with(|held| held.get().1);
    (result, (peak - before).max(0) as usize)
}
