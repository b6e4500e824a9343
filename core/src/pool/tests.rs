//! Unit tests of `pool`.

use super::*;
use std::vec::Vec;

#[test]
fn acquire_until_empty_then_reuse() {
    let pool: EventPool<4, 16> = EventPool::new();
    let mut acq = pool.acquirer().unwrap();
    assert!(pool.acquirer().is_none());
    let mut held: Vec<_> = (0..4).map(|_| acq.acquire().unwrap()).collect();
    assert!(acq.acquire().is_none());
    held.pop();
    let again = acq.acquire().unwrap();
    assert_eq!(again.index(), 3);
    assert!(acq.acquire().is_none());
}

#[test]
fn last_clone_returns_the_slot() {
    let pool: EventPool<1, 8> = EventPool::new();
    let mut acq = pool.acquirer().unwrap();
    let mut slot = acq.acquire().unwrap();
    slot.buffer_mut()[..3].copy_from_slice(b"abc");
    let a = slot.share(3);
    let b = a.clone();
    assert_eq!(b.ref_count(), 2);
    assert_eq!(b.bytes(), b"abc");
    drop(a);
    assert!(acq.acquire().is_none());
    drop(b);
    assert!(acq.acquire().is_some());
}

#[test]
fn buffer_pool_checks_its_buffers() {
    let mut meta: Vec<SlotMeta> = (0..4).map(|_| SlotMeta::new()).collect();
    let mut data = [0u8; 15];
    assert_eq!(
        BufferPool::new(&mut meta, &mut data, 4).err(),
        Some(PoolError::DataTooSmall)
    );
    assert_eq!(
        BufferPool::new(&mut meta, &mut data, 0).err(),
        Some(PoolError::Shape)
    );
    let mut data = [0u8; 16];
    let pool = BufferPool::new(&mut meta, &mut data, 4).unwrap();
    let mut acq = pool.acquirer().unwrap();
    let mut s = acq.acquire().unwrap();
    s.buffer_mut().copy_from_slice(&[1, 2, 3, 4]);
    let r = s.share(100);
    assert_eq!(r.bytes(), &[1, 2, 3, 4]);
    assert_eq!(acq.ready(), 3);
}

#[test]
fn handles_released_on_other_threads_come_back() {
    let pool: EventPool<8, 32> = EventPool::new();
    let mut acq = pool.acquirer().unwrap();
    let rounds = if cfg!(miri) { 200 } else { 20_000 };
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<EventRef<'_>>(4);
        s.spawn(move || {
            for r in rx {
                assert_eq!(r.bytes()[0] as u32, r.index());
                let c = r.clone();
                drop(r);
                drop(c);
            }
        });
        let mut sent = 0;
        while sent < rounds {
            match acq.acquire() {
                Some(mut slot) => {
                    let i = slot.index() as u8;
                    slot.buffer_mut()[0] = i;
                    tx.send(slot.share(1)).unwrap();
                    sent += 1;
                }
                None => std::thread::yield_now(),
            }
        }
    });
    let all: Vec<_> = (0..8).map_while(|_| acq.acquire()).collect();
    assert_eq!(all.len(), 8);
}
