//! Decode + CRC check of a 256-byte v1 frame (target: <= 100 ns), the
//! streaming decoder over a chunk of many frames, and ack encoding.
//! Peer: the same CRC-32C computed by the hardware-accelerated `crc32c`
//! crate, i.e. the cost floor of checking the frame at all.
//!
//! Run: `cargo bench -p eventstream-benches --bench wire`

use std::hint::black_box;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use eventstream_benches::{print_ratios, record};
use eventstream_core::wire::{Ack, Decoded, Frame, FrameRepr, Limits, StreamDecoder, FLAG_ACK};
use eventstream_core::Priority;

fn frame_256() -> Vec<u8> {
    let topic = b"orders/eu";
    let payload = vec![0x5Au8; 256 - 40 - topic.len()];
    let repr = FrameRepr {
        priority: Priority::Medium,
        flags: FLAG_ACK,
        partition: 3,
        event_id: 0x0102_0304_0506_0708,
        timestamp_ns: 1_764_253_200_000_000_000,
        topic,
        payload: &payload,
    };
    let mut buf = vec![0u8; repr.encoded_len()];
    repr.encode(&mut buf).unwrap();
    assert_eq!(buf.len(), 256);
    buf
}

fn bench(c: &mut Criterion) {
    let frame = frame_256();
    let limits = Limits::DEFAULT;
    let mut g = c.benchmark_group("wire");
    g.throughput(Throughput::Elements(1));

    g.bench_function("decode+crc 256B frame (ours)", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                let f = Frame::parse(black_box(&frame), &limits);
                black_box(f.map(|f| f.event_id()).ok());
            }
            let e = t.elapsed();
            record("decode+crc 256B frame (ours)", iters, e);
            e
        })
    });
    g.bench_function("crc32c crate, SSE4.2 CRC only (peer)", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                black_box(::crc32c::crc32c(black_box(&frame[..252])));
            }
            let e = t.elapsed();
            record("crc32c crate, SSE4.2 CRC only (peer)", iters, e);
            e
        })
    });
    g.bench_function("core crc32c, 252 bytes only", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                black_box(eventstream_core::crc32c::checksum(black_box(&frame[..252])));
            }
            let e = t.elapsed();
            record("core crc32c, 252 bytes only", iters, e);
            e
        })
    });

    // 256 frames back to back in one 64 KiB chunk, as one socket read.
    let chunk: Vec<u8> = frame.iter().copied().cycle().take(256 * 256).collect();
    g.throughput(Throughput::Elements(256));
    g.bench_function("stream decoder, 64 KiB chunk of 256B frames", |b| {
        let mut dec = StreamDecoder::new([0u8; 512], limits).unwrap();
        // Select the v1 dialect once.
        let _ = dec.next(&frame);
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                let mut pos = 0;
                let mut n = 0u32;
                loop {
                    let (used, item) = dec.next(&chunk[pos..]);
                    pos += used;
                    match item {
                        Some(Decoded::Frame(f)) => n = n.wrapping_add(f.partition()),
                        Some(_) => {}
                        None => break,
                    }
                }
                black_box(n);
            }
            let e = t.elapsed();
            record("stream decoder, 64 KiB chunk of 256B frames", iters, e);
            e
        })
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("ack encode", |b| {
        b.iter(|| black_box(Ack::stored(black_box(42), black_box(7)).encode()))
    });
    g.finish();

    print_ratios(
        "decode + CRC check of a 256-byte v1 frame",
        1,
        "decode+crc 256B frame (ours)",
        &[
            "crc32c crate, SSE4.2 CRC only (peer)",
            "core crc32c, 252 bytes only",
        ],
    );
    print_ratios(
        "streaming decoder",
        256,
        "stream decoder, 64 KiB chunk of 256B frames",
        &[],
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
