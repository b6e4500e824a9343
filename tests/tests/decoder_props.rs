//! Property tests of the streaming decoder: a stream of mixed valid and
//! invalid frames gives exactly the expected results however it is split,
//! and arbitrary bytes never panic and give split-independent results.

use eventstream_core::wire::{
    peek_v1, seal, FrameRepr, LegacyRule, Limits, Reason, FLAG_ACK, FLAG_LEGACY,
};
use eventstream_core::Priority;
use eventstream_tests::decode::{decode_chunks, Item};
use proptest::prelude::*;

#[derive(Clone, Copy, Debug)]
enum V1Kind {
    Valid,
    BadCrc,
    BadVersion,
    LengthMismatch,
    BadPriority,
    BadFlags,
    EmptyTopic,
    TopicTooLong,
    TopicNotUtf8,
}

fn v1_kind() -> impl Strategy<Value = V1Kind> {
    prop_oneof![
        6 => Just(V1Kind::Valid),
        1 => Just(V1Kind::BadCrc),
        1 => Just(V1Kind::BadVersion),
        1 => Just(V1Kind::LengthMismatch),
        1 => Just(V1Kind::BadPriority),
        1 => Just(V1Kind::BadFlags),
        1 => Just(V1Kind::EmptyTopic),
        1 => Just(V1Kind::TopicTooLong),
        1 => Just(V1Kind::TopicNotUtf8),
    ]
}

/// One v1 frame of the given kind and the result the decoder must give.
fn v1_frame(
    kind: V1Kind,
    id: u64,
    ack: bool,
    prio: u8,
    topic_len: usize,
    payload_len: usize,
) -> (Vec<u8>, Item) {
    let topic = vec![b't'; topic_len.max(1)];
    let payload: Vec<u8> = (0..payload_len).map(|i| i as u8).collect();
    let repr = FrameRepr {
        priority: Priority::from_u8(prio).unwrap(),
        flags: if ack { FLAG_ACK } else { 0 },
        partition: id as u32,
        event_id: id,
        timestamp_ns: id * 3,
        topic: &topic,
        payload: &payload,
    };
    let mut f = vec![0u8; repr.encoded_len()];
    repr.encode(&mut f).unwrap();
    let rejected = |reason| Item::Rejected {
        reason,
        event_id: id,
        ack,
    };
    let n = f.len();
    let item = match kind {
        V1Kind::Valid => Item::Frame(f.clone()),
        V1Kind::BadCrc => {
            f[n - 1] ^= 0x5A;
            return (f, rejected(Reason::BadCrc));
        }
        V1Kind::BadVersion => {
            f[8] = 2;
            rejected(Reason::BadVersion)
        }
        V1Kind::LengthMismatch => {
            f[32] = f[32].wrapping_add(1);
            rejected(Reason::BadLength)
        }
        V1Kind::BadPriority => {
            f[9] = 5 + prio;
            rejected(Reason::BadPriority)
        }
        V1Kind::BadFlags => {
            f[10] |= FLAG_LEGACY;
            rejected(Reason::BadFlags)
        }
        V1Kind::EmptyTopic => {
            // topic_len 0 with the topic's bytes counted in the payload.
            f[11] = 0;
            let pl = (payload.len() + topic.len()) as u32;
            f[32..36].copy_from_slice(&pl.to_le_bytes());
            rejected(Reason::BadTopic)
        }
        V1Kind::TopicTooLong => {
            let repr = FrameRepr {
                topic: &[b'x'; 65],
                ..repr
            };
            let mut g = vec![0u8; repr.encoded_len()];
            repr.encode(&mut g).unwrap();
            return (g, rejected(Reason::BadTopic));
        }
        V1Kind::TopicNotUtf8 => {
            f[36] = 0xFF;
            rejected(Reason::BadTopic)
        }
    };
    seal(&mut f);
    (f, item)
}

fn cuts_to_chunks(stream: &[u8], mut cuts: Vec<usize>) -> Vec<&[u8]> {
    cuts.iter_mut().for_each(|c| *c %= stream.len() + 1);
    cuts.sort_unstable();
    let mut chunks = Vec::new();
    let mut at = 0;
    for c in cuts {
        chunks.push(&stream[at..c]);
        at = c;
    }
    chunks.push(&stream[at..]);
    chunks
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn mixed_v1_stream_decodes_identically_for_any_split(
        frames in prop::collection::vec((v1_kind(), any::<bool>(), 0u8..5, 1usize..40, 0usize..300), 1..20),
        fatal in prop_oneof![Just(None), Just(Some(Reason::BadMagic)), Just(Some(Reason::BadLength))],
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let mut stream = Vec::new();
        let mut want = Vec::new();
        for (i, (kind, ack, prio, tl, pl)) in frames.into_iter().enumerate() {
            // A valid first frame selects the v1 dialect.
            let kind = if i == 0 { V1Kind::Valid } else { kind };
            let (bytes, item) = v1_frame(kind, i as u64 + 1, ack, prio, tl, pl);
            stream.extend_from_slice(&bytes);
            want.push((Some(stream.len()), item));
        }
        match fatal {
            Some(Reason::BadMagic) => stream.extend_from_slice(b"ESC2\x30\0\0\0"),
            Some(_) => stream.extend_from_slice(b"ESC1\x01\x02\0\0"),
            None => {}
        }
        if let Some(r) = fatal {
            want.push((None, Item::Fatal(r)));
            stream.extend_from_slice(&[0xEE; 50]);
        }
        let got = decode_chunks(Limits::DEFAULT, cuts_to_chunks(&stream, cuts));
        prop_assert_eq!(got, want);
    }

    #[test]
    fn mixed_legacy_stream_decodes_identically_for_any_split(
        frames in prop::collection::vec((0u8..8, 0u8..7, 0usize..70, 0usize..200), 1..20),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let limits = Limits::DEFAULT;
        let mut stream = Vec::new();
        let mut want = Vec::new();
        for (i, (kind, prio, tl, pl)) in frames.into_iter().enumerate() {
            // The first frame must not start with ESC1 (it does not: its
            // first byte is the high byte of a small length).
            let _ = i;
            let topic = vec![b'a'; tl];
            let payload = vec![7u8; pl];
            let mut body = vec![prio];
            let (topic_len, item) = match kind {
                0 => {
                    stream.extend_from_slice(&[0, 0, 0, 0]);
                    want.push((Some(stream.len()), Item::KeepAlive));
                    continue;
                }
                1 => {
                    // body_len 1 or 2
                    let b: Vec<u8> = vec![prio; 1 + tl % 2];
                    stream.extend_from_slice(&(b.len() as u32).to_be_bytes());
                    stream.extend_from_slice(&b);
                    want.push((Some(stream.len()), Item::Skipped(LegacyRule::BodyTooShort)));
                    continue;
                }
                2 => (tl as u16 + 200, Item::Skipped(LegacyRule::TopicPastBody)),
                3 if tl > 0 && topic.len() <= 64 => {
                    body.extend_from_slice(&(tl as u16).to_be_bytes());
                    body.extend_from_slice(&[0xC0; 1]);
                    body.extend_from_slice(&topic[1..]);
                    body.extend_from_slice(&payload);
                    stream.extend_from_slice(&(body.len() as u32).to_be_bytes());
                    stream.extend_from_slice(&body);
                    want.push((Some(stream.len()), Item::Skipped(LegacyRule::TopicNotUtf8)));
                    continue;
                }
                _ => {
                    let item = if tl == 0 {
                        Item::Skipped(LegacyRule::TopicEmpty)
                    } else if tl > 64 {
                        Item::Skipped(LegacyRule::TopicTooLong)
                    } else if prio > 4 {
                        Item::Skipped(LegacyRule::BadPriority)
                    } else {
                        Item::Legacy { priority: Priority::from_u8(prio).unwrap(), topic: topic.clone(), payload: payload.clone() }
                    };
                    (tl as u16, item)
                }
            };
            body.extend_from_slice(&topic_len.to_be_bytes());
            body.extend_from_slice(&topic);
            body.extend_from_slice(&payload);
            if body.len() as u64 + 37 > limits.max_frame() as u64 {
                continue;
            }
            stream.extend_from_slice(&(body.len() as u32).to_be_bytes());
            stream.extend_from_slice(&body);
            want.push((Some(stream.len()), item));
        }
        prop_assume!(!stream.starts_with(b"ESC1"));
        let got = decode_chunks(limits, cuts_to_chunks(&stream, cuts));
        prop_assert_eq!(got, want);
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_ignore_splits(
        prefix in prop_oneof![Just(b"ESC1".to_vec()), Just(Vec::new())],
        bytes in prop::collection::vec(any::<u8>(), 0..2000),
        cuts in prop::collection::vec(any::<usize>(), 0..16),
        max_frame in 41u32..2000,
        max_topic in 1u8..=255,
    ) {
        let limits = Limits::new(max_frame, max_topic).unwrap();
        let mut stream = prefix;
        stream.extend_from_slice(&bytes);
        let whole = decode_chunks(limits, [&stream[..]]);
        let split = decode_chunks(limits, cuts_to_chunks(&stream, cuts));
        prop_assert_eq!(whole, split);
    }

    #[test]
    fn peek_v1_reads_the_heads_of_the_frames_the_decoder_finds(
        frames in prop::collection::vec((v1_kind(), any::<bool>(), 0u8..5, 1usize..40, 0usize..300), 1..20),
    ) {
        // Ingest reads frames' heads ahead of the decoder to prefetch their
        // dedup slots: every head it reads must be the frame the decoder
        // finds there, and it must stop (None) rather than guess.
        let mut stream = Vec::new();
        let mut heads = Vec::new();
        for (i, (kind, ack, prio, tl, pl)) in frames.into_iter().enumerate() {
            let start = stream.len();
            let (bytes, _) = v1_frame(kind, i as u64 + 1, ack, prio, tl, pl);
            stream.extend_from_slice(&bytes);
            heads.push((start, stream.len(), i as u64 + 1, prio, kind));
        }
        for (start, end, id, prio, kind) in heads {
            // A frame not all there is never read.
            prop_assert!(peek_v1(&stream[start..end - 1]).is_none());
            match peek_v1(&stream[start..]) {
                Some(h) => {
                    prop_assert_eq!(start + h.len, end);
                    prop_assert_eq!(h.event_id, id);
                    prop_assert_eq!(h.priority.code(), prio);
                }
                None => {
                    // Only what the layout check refuses stops it inside
                    // the stream: a priority above 4, or length fields
                    // that disagree.
                    prop_assert!(
                        matches!(kind, V1Kind::BadPriority | V1Kind::LengthMismatch),
                        "stopped at a {:?} frame",
                        kind
                    );
                    break;
                }
            }
        }
    }

    #[test]
    fn peek_v1_never_panics_and_never_reads_past_its_input(
        prefix in prop_oneof![Just(b"ESC1".to_vec()), Just(Vec::new())],
        bytes in prop::collection::vec(any::<u8>(), 0..700),
    ) {
        let mut input = prefix;
        input.extend_from_slice(&bytes);
        if let Some(h) = peek_v1(&input) {
            prop_assert!((40..=input.len()).contains(&h.len));
            prop_assert!(h.topic.len() <= h.len - 40);
        }
    }
}
