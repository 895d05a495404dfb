//! openraft's async runtime for blx: tokio, as openraft's own `TokioRuntime`, except for the
//! random numbers openraft draws (its election timeouts), which come from a per-thread
//! generator that the agent seeds from the entropy it is given.
//!
//! openraft asks for randomness through a static function, so the generator cannot travel in
//! a value: it lives in a thread-local. [`seed_thread_rng`] seeds the calling thread's; a
//! thread nobody seeded draws its seed from the operating system on first use. A simulator
//! that runs every agent on one thread seeds it once per agent start, in a fixed order, and
//! so replays the same timeouts.

use std::cell::Cell;
use std::future::Future;
use std::time::Duration;

use openraft::{AsyncRuntime, OptionalSend, TokioInstant};

thread_local! {
    static STATE: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Seeds this thread's generator: every later draw on this thread follows from `seed`.
pub fn seed_thread_rng(seed: u64) {
    STATE.with(|s| s.set(Some(seed)));
}

fn os_seed() -> u64 {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    // An OS without a random source cannot run TLS either; fall back to a fixed seed rather
    // than panicking inside openraft.
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    u64::from_le_bytes(bytes)
}

/// splitmix64: small, fast, and good enough for election timeouts (nothing secret is drawn).
fn next_u64() -> u64 {
    STATE.with(|s| {
        let mut x = s.get().unwrap_or_else(os_seed);
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        s.set(Some(x));
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

/// A handle on the calling thread's generator, as openraft takes it.
#[derive(Debug, Default, Clone, Copy)]
pub struct ThreadRng;

impl rand_core::RngCore for ThreadRng {
    fn next_u32(&mut self) -> u32 {
        (next_u64() >> 32) as u32
    }

    fn next_u64(&mut self) -> u64 {
        next_u64()
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            let bytes = next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

/// tokio, with [`ThreadRng`] for openraft's random draws.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BlxRuntime;

impl AsyncRuntime for BlxRuntime {
    type JoinError = tokio::task::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = tokio::task::JoinHandle<T>;
    type Sleep = tokio::time::Sleep;
    type Instant = TokioInstant;
    type TimeoutError = tokio::time::error::Elapsed;
    type Timeout<R, T: Future<Output = R> + OptionalSend> = tokio::time::Timeout<T>;
    type ThreadLocalRng = ThreadRng;
    type OneshotSender<T: OptionalSend> = openraft::async_runtime::TokioOneShotSender<T>;
    type OneshotReceiver<T: OptionalSend> = tokio::sync::oneshot::Receiver<T>;
    type OneshotReceiverError = tokio::sync::oneshot::error::RecvError;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        tokio::task::spawn(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        tokio::time::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        tokio::time::sleep_until(deadline)
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(
        duration: Duration,
        future: F,
    ) -> Self::Timeout<R, F> {
        tokio::time::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(
        deadline: Self::Instant,
        future: F,
    ) -> Self::Timeout<R, F> {
        tokio::time::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        join_error.is_panic()
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        ThreadRng
    }

    fn oneshot<T>() -> (Self::OneshotSender<T>, Self::OneshotReceiver<T>)
    where
        T: OptionalSend,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (openraft::async_runtime::TokioOneShotSender(tx), rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::RngCore;

    #[test]
    fn a_seeded_thread_repeats_its_draws() {
        seed_thread_rng(42);
        let a: Vec<u64> = (0..4).map(|_| ThreadRng.next_u64()).collect();
        seed_thread_rng(42);
        let b: Vec<u64> = (0..4).map(|_| ThreadRng.next_u64()).collect();
        assert_eq!(a, b);
        seed_thread_rng(43);
        assert_ne!(ThreadRng.next_u64(), a[0]);
    }
}
