//! A single-waiter, single-thread wake-up flag for per-core tasks.
//!
//! Producers (any task on the same core) call [`Notify::notify`] as often as
//! they like; the one consumer task awaits [`Notify::notified`]. Many notifies
//! between two polls collapse into one wake-up, which is what batches many
//! small frames into one write. `Cell`s only: the owner is one core.

use std::cell::Cell;
use std::future::poll_fn;
use std::task::{Poll, Waker};

#[derive(Default)]
pub struct Notify {
    pending: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl Notify {
    pub fn new() -> Notify {
        Notify::default()
    }

    /// Marks work pending and wakes the waiting task, if any.
    #[inline]
    pub fn notify(&self) {
        self.pending.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Completes once a notify happened since the last completion.
    pub async fn notified(&self) {
        poll_fn(|cx| {
            if self.pending.replace(false) {
                Poll::Ready(())
            } else {
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }
}

impl std::fmt::Debug for Notify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notify").field("pending", &self.pending.get()).finish()
    }
}

/// Lets the other tasks of this core run before continuing.
pub async fn yield_now() {
    let mut yielded = false;
    poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}
