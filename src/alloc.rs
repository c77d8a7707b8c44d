//! The process's allocator, chosen once at start by `AXION_ALLOCATOR`:
//! `mimalloc` (the default) or `system` (glibc's malloc).
//!
//! The two trade CPU for memory under subscription churn (BENCHMARKS.md,
//! "The allocator holds the climb"). mimalloc is the faster for the small
//! buffers the broker, its sessions and the queue store allocate per
//! message: with glibc the queue benchmark needs 1.2× the server CPU per
//! task. But when clients keep subscribing to new filters and leaving, the
//! router is renewed every few seconds on a fresh thread, and mimalloc's
//! resident memory climbs (59–114 MiB over 20 minutes of the soak, ~94 MiB
//! kept after every client left) where glibc's stays in a flat band
//! (33–46 MiB). A broker with heavy churn and little traffic is better off
//! with `system`.
//!
//! The choice is read with libc's `getenv` on the first allocation, before
//! anything is allocated, so every block is freed by the allocator that
//! made it. `main` refuses a value it does not know.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ffi::{c_char, CStr};
use std::sync::atomic::{AtomicU8, Ordering};

use mimalloc::MiMalloc;

/// The environment variable that chooses the allocator.
pub const ENV: &str = "AXION_ALLOCATOR";

const UNDECIDED: u8 = 0;
const MIMALLOC: u8 = 1;
const SYSTEM: u8 = 2;
/// A value `main` refuses; allocates as the default meanwhile.
const UNKNOWN: u8 = 3;

static CHOSEN: AtomicU8 = AtomicU8::new(UNDECIDED);

fn from_value(value: Option<&[u8]>) -> u8 {
    match value {
        None | Some(b"") | Some(b"mimalloc") => MIMALLOC,
        Some(b"system") => SYSTEM,
        Some(_) => UNKNOWN,
    }
}

fn read_choice() -> u8 {
    extern "C" {
        fn getenv(name: *const c_char) -> *const c_char;
    }
    // SAFETY: `getenv` is given a NUL-terminated name and returns null or
    // a NUL-terminated string owned by the environment, read at once. No
    // thread changes the environment this early (the first allocation).
    let value = unsafe {
        let value = getenv(c"AXION_ALLOCATOR".as_ptr());
        (!value.is_null()).then(|| CStr::from_ptr(value).to_bytes())
    };
    from_value(value)
}

fn chosen() -> u8 {
    match CHOSEN.load(Ordering::Relaxed) {
        UNDECIDED => {
            let choice = read_choice();
            // Two first allocations at once read the same environment; the
            // first to store wins either way.
            match CHOSEN.compare_exchange(UNDECIDED, choice, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => choice,
                Err(earlier) => earlier,
            }
        }
        choice => choice,
    }
}

/// The allocator in use, for the start-up log line; `Err` with the value
/// of `AXION_ALLOCATOR` when it names none.
pub fn in_use() -> Result<&'static str, String> {
    match chosen() {
        SYSTEM => Ok("system"),
        UNKNOWN => Err(std::env::var(ENV).unwrap_or_default()),
        _ => Ok("mimalloc"),
    }
}

/// The allocator `main` installs: whichever `AXION_ALLOCATOR` chose.
pub struct Chosen;

// SAFETY: the choice is made once, before the first block exists, and
// never changes: every block is freed or grown by the allocator that made
// it, which upholds both allocators' contracts.
unsafe impl GlobalAlloc for Chosen {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if chosen() == SYSTEM {
            System.alloc(layout)
        } else {
            MiMalloc.alloc(layout)
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if chosen() == SYSTEM {
            System.alloc_zeroed(layout)
        } else {
            MiMalloc.alloc_zeroed(layout)
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if chosen() == SYSTEM {
            System.dealloc(ptr, layout)
        } else {
            MiMalloc.dealloc(ptr, layout)
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if chosen() == SYSTEM {
            System.realloc(ptr, layout, new_size)
        } else {
            MiMalloc.realloc(ptr, layout, new_size)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_name_an_allocator_or_are_refused() {
        assert_eq!(from_value(None), MIMALLOC);
        assert_eq!(from_value(Some(b"")), MIMALLOC);
        assert_eq!(from_value(Some(b"mimalloc")), MIMALLOC);
        assert_eq!(from_value(Some(b"system")), SYSTEM);
        assert_eq!(from_value(Some(b"glibc")), UNKNOWN);
        assert_eq!(from_value(Some(b"System")), UNKNOWN);
    }
}
