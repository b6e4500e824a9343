//! The appliance: an image shaped like product firmware, its tasks on RTIC
//! (v2). It collects events from its own sources (a sensor task that
//! makes one event of every priority in turn each millisecond, and a byte
//! stream in the original EventStreamCore's legacy format), runs them
//! through the core's pipeline (dedup, batch windows) into a flash log
//! that survives power cuts, and streams the log to `eventstream serve`
//! through UART0 (an uplink task; the receive interrupt's task queues the
//! acks), exactly once for transactional events.
//!
//! Under QEMU the UART is a TCP socket (`-serial tcp:HOST:PORT,reconnect=1`)
//! and the flash log lives in the board's PSRAM at 0x2100_0000, which QEMU
//! backs with a file (`-object memory-backend-file,...`), so a restart of
//! QEMU is a power cut the log recovers from. It makes `TOTAL` events over
//! all its boots (the log's next offset counts them), waits until every
//! one is delivered, prints its figures and exits through semihosting.
#![no_std]
#![no_main]

#[path = "../board.rs"]
mod board;
#[path = "../common.rs"]
mod common;
mod uart;

use core::sync::atomic::{AtomicU32, Ordering};

use common::TakeOnce;
// The reset handler and vector table (RTIC provides `main`).
use cortex_m_rt as _;
use cortex_m_semihosting::debug;
use defmt_semihosting as _;
use eventstream_core::batch::{BatchConfig, StaticBatchWindows};
use eventstream_core::dedup::{DedupConfig, DedupTable, FullPolicy as DedupFull};
use eventstream_core::flash::{FlashLog, MemFlash};
use eventstream_core::metrics::{Registry, COARSE};
use eventstream_core::pipeline::{Clock, Event, Parts, Pipeline, Sink, StorageFailed, WhenFull};
use eventstream_core::pool::EventPool;
use eventstream_core::record::RECORD_HEADER_LEN;
use eventstream_core::ring::Ring;
use eventstream_core::route::TopicTable;
use eventstream_core::uplink::{Uplink, UplinkConfig};
use eventstream_core::wire::{Ack, FrameRepr, Limits, Reason, Status, StreamDecoder, FLAG_ACK};
use eventstream_core::Priority;

/// Pool slots and their size: the largest frame the appliance makes.
const SLOTS: usize = 16;
const SLOT: usize = 256;
/// Events per batch window.
const BATCH_EVENTS: usize = 8;
/// One record: a full batch of maximal frames.
const RECORD: usize = RECORD_HEADER_LEN + BATCH_EVENTS * SLOT;
/// The flash log: 16 sectors of 4 KiB in PSRAM.
const SECTOR: usize = 4096;
const SECTORS: usize = 16;
const FLASH_BASE: usize = 0x2100_0000;
/// This appliance's number: in its events' ids, so that several
/// appliances feeding one server never share an id.
const DEVICE_ID: u64 = 1;
/// Events the appliance makes over all its boots.
const TOTAL: u64 = 3000;
/// One legacy event after every this many sensor events.
const LEGACY_EVERY: u32 = 10;
/// RAM the image may use, statics and stack.
const RAM_BUDGET: usize = 48 * 1024;
const WINDOW_MS: u32 = 60_000;
/// Frames up to `max_frame` bytes, topics up to 32.
const fn limits(max_frame: usize) -> Limits {
    match Limits::new(max_frame as u32, 32) {
        Ok(l) => l,
        Err(_) => Limits::DEFAULT,
    }
}
/// Frames up to a pool slot.
const LIMITS: Limits = limits(SLOT);
/// The legacy source's frames are short (a body under 64 bytes).
const LEGACY: usize = 128;
const LEGACY_LIMITS: Limits = limits(LEGACY);
/// Bytes received and not yet read by the uplink: the acks of every
/// event in flight, with room to spare.
const RX_QUEUE: usize = 256;

static POOL: EventPool<SLOTS, SLOT> = EventPool::new();
static RT_IN: Ring<Event<'static>, 4> = Ring::new();
static TX_IN: Ring<Event<'static>, 4> = Ring::new();
static BATCH_IN: Ring<Event<'static>, 4> = Ring::new();
static DEDUP: DedupTable<1024> = DedupTable::new(DedupConfig {
    window_ms: WINDOW_MS,
    when_full: DedupFull::Evict,
});
static WINDOWS: TakeOnce<StaticBatchWindows<Event<'static>, 8, 32>> =
    TakeOnce::new(StaticBatchWindows::new());
static RECORD_BUF: TakeOnce<[u8; RECORD]> = TakeOnce::new([0; RECORD]);
static UPLINK: TakeOnce<Uplink<8, RECORD, SLOT>> = TakeOnce::new(Uplink::new(UplinkConfig {
    max_in_flight: 8,
    ack_timeout_ms: 2000,
    quiet_ms: 1500,
    legacy_id_base: (1 << 63) | (DEVICE_ID << 40),
}));
static REGISTRY: Registry<COARSE> = Registry::empty();
static ROUTER: TopicTable<4> = TopicTable::new();

/// The monotonic's last 32-bit reading and how often it wrapped.
static LAST_TICKS: AtomicU32 = AtomicU32::new(0);
static WRAPS: AtomicU32 = AtomicU32::new(0);

/// Milliseconds since boot, from RTIC's SysTick monotonic (32-bit ticks,
/// which wrap after 49.7 days: the wraps are counted here; both tasks that
/// read the clock run at one priority and read it every millisecond).
fn now_ms() -> u64 {
    use rtic_monotonics::Monotonic;
    let t = app::Mono::now().ticks();
    if t < LAST_TICKS.swap(t, Ordering::Relaxed) {
        WRAPS.fetch_add(1, Ordering::Relaxed);
    }
    (u64::from(WRAPS.load(Ordering::Relaxed)) << 32) | u64::from(t)
}

/// The board's clock: no real-time clock, so wall time is a fixed epoch
/// plus the time since boot.
pub struct BoardClock;

impl Clock for BoardClock {
    fn monotonic_ns(&self) -> u64 {
        now_ms() * 1_000_000
    }
    fn wall_ns(&self) -> u64 {
        1_764_253_200_000_000_000 + now_ms() * 1_000_000
    }
}

type Flash = MemFlash<'static, 4, SECTOR>;
type Log = FlashLog<Flash, SECTORS>;

/// The pipeline's storage: the flash log; its acks go back to the sensor.
pub struct FlashSink {
    log: Log,
    /// Sensor events refused for now (the flash was full): made again.
    retry: heapless::Deque<u64, 64>,
}

impl Sink for FlashSink {
    fn next_offset(&self) -> u64 {
        self.log.next_offset()
    }

    fn append(&mut self, record: &[u8], _events: u16) -> Result<(), StorageFailed> {
        self.log
            .append(record)
            .map(|_| ())
            .map_err(|_| StorageFailed)
    }

    fn ack(&mut self, _conn: u32, ack: Ack) {
        if ack.status == Status::Rejected && ack.reason != Reason::BadTopic {
            let _ = self.retry.push_back(ack.event_id);
        }
    }
}

type Engine = Pipeline<'static, 'static, 'static, TopicTable<4>, BoardClock, FlashSink, (), COARSE>;

/// The sensor task's state.
pub struct Sensor {
    /// Ids: the device, the boot's base (the log's next offset at boot,
    /// which every stored event of earlier boots is below) and a counter.
    base: u64,
    seq: u64,
    made: u32,
    v1: StreamDecoder<[u8; SLOT]>,
    legacy: StreamDecoder<[u8; LEGACY]>,
}

/// Ends the run through semihosting.
fn exit(ok: bool) -> ! {
    debug::exit(if ok {
        debug::EXIT_SUCCESS
    } else {
        debug::EXIT_FAILURE
    });
    loop {
        cortex_m::asm::bkpt();
    }
}

/// The sensor's event `id`: its priority, topic and payload follow from
/// the id, so a refused one is made again the same.
fn sensor_frame(buf: &mut [u8], id: u64) -> usize {
    let priority = Priority::ALL[(id % 5) as usize];
    let topic: &[u8] = [
        b"appliance/batch" as &[u8],
        b"appliance/low",
        b"appliance/medium",
        b"appliance/high",
        b"appliance/critical",
    ][(id % 5) as usize];
    let mut payload = [0u8; 120];
    for (i, b) in payload.iter_mut().enumerate() {
        *b = (i as u8) ^ (id as u8);
    }
    FrameRepr {
        priority,
        flags: FLAG_ACK,
        partition: (id % 4) as u32,
        event_id: id,
        timestamp_ns: 1_764_253_200_000_000_000 + now_ms() * 1_000_000,
        topic,
        payload: &payload[..40 + (id as usize * 13) % 80],
    }
    .encode(buf)
    .unwrap_or(0)
}

/// A legacy frame (big-endian body length, priority, topic length, topic,
/// payload), as the original C++ clients send them.
fn legacy_frame(buf: &mut [u8; 64], n: u32) -> usize {
    let topic = b"appliance/legacy";
    let payload = [b'L', (n >> 8) as u8, n as u8, b'!'];
    let body = 3 + topic.len() + payload.len();
    buf[..4].copy_from_slice(&(body as u32).to_be_bytes());
    buf[4] = (n % 5) as u8;
    buf[5..7].copy_from_slice(&(topic.len() as u16).to_be_bytes());
    buf[7..7 + topic.len()].copy_from_slice(topic);
    buf[7 + topic.len()..4 + body].copy_from_slice(&payload);
    4 + body
}

/// Feeds `bytes` whole (running the pipeline while it is full).
fn feed<const N: usize>(
    p: &mut Engine,
    conn: u32,
    dec: &mut StreamDecoder<[u8; N]>,
    mut bytes: &[u8],
) {
    while !bytes.is_empty() {
        let fed = p.feed(conn, dec, bytes);
        bytes = &bytes[fed.consumed..];
        if fed.close {
            return;
        }
        if fed.blocked || fed.consumed == 0 {
            p.poll();
        }
    }
}

#[rtic::app(device = crate::board, peripherals = false, dispatchers = [UART2RX, UART2TX])]
mod app {
    use super::*;
    use heapless::spsc::{Producer, Queue};
    use rtic_monotonics::systick::prelude::*;

    systick_monotonic!(Mono, 1_000);

    #[shared]
    struct Shared {
        /// The pipeline and, as its sink, the flash log (both tasks that
        /// use it run at one priority, so its lock costs nothing).
        engine: Engine,
    }

    #[local]
    struct Local {
        received: Producer<'static, u8>,
        link: uart::Link,
        uplink: &'static mut Uplink<8, RECORD, SLOT>,
        sensor: Sensor,
        painted: (usize, usize),
    }

    #[init(local = [rx: Queue<u8, RX_QUEUE> = Queue::new()])]
    fn init(cx: init::Context) -> (Shared, Local) {
        let painted = common::paint_stack();
        // 1 ms ticks of the 25 MHz system clock.
        Mono::start(cx.core.SYST, 25_000_000);
        let (Some(scan), Some(uplink), Some(windows)) =
            (RECORD_BUF.take(), UPLINK.take(), WINDOWS.take())
        else {
            exit(false)
        };
        // SAFETY: the PSRAM at FLASH_BASE is mapped on this board, and
        // nothing else in the image uses it (the linker places nothing
        // there); this is the only reference made to it.
        let mem =
            unsafe { core::slice::from_raw_parts_mut(FLASH_BASE as *mut u8, SECTOR * SECTORS) };
        // The record buffer reads the flash log at boot, then builds
        // records.
        let mut log: Log = match FlashLog::open(
            MemFlash::new(mem),
            eventstream_core::flash::FullPolicy::StopAccepting,
            scan,
        ) {
            Ok(l) => l,
            Err(e) => {
                defmt::error!("appliance: flash log: {}", e);
                exit(false)
            }
        };
        let s = log.stats();
        let rebuilt = log
            .rebuild_dedup(
                DEDUP.table(),
                u64::from(WINDOW_MS),
                BoardClock.wall_ns(),
                now_ms(),
                scan,
            )
            .unwrap_or(0);
        defmt::info!(
            "appliance: boot: log at offset {}, {} undelivered records, torn tail {}, {} ids in the dedup table",
            log.next_offset(),
            s.recovered_records,
            s.torn_tail,
            rebuilt
        );
        let base = log.next_offset();
        let Some(engine) = build(log, scan, windows) else {
            defmt::error!("appliance: the pipeline's parts were taken");
            exit(false)
        };
        let (Ok(v1), Ok(legacy)) = (
            StreamDecoder::new([0u8; SLOT], LIMITS),
            StreamDecoder::new([0u8; LEGACY], LEGACY_LIMITS),
        ) else {
            exit(false)
        };
        let (received, queued) = cx.local.rx.split();
        uart::enable();
        if sensor::spawn().is_err() || uplink::spawn().is_err() {
            exit(false)
        }
        (
            Shared { engine },
            Local {
                received,
                link: uart::Link { received: queued },
                uplink,
                sensor: Sensor {
                    base,
                    seq: 0,
                    made: 0,
                    v1,
                    legacy,
                },
                painted,
            },
        )
    }

    #[idle]
    fn idle(_: idle::Context) -> ! {
        loop {
            cortex_m::asm::wfi();
        }
    }

    /// UART0 received bytes (acks): into the queue.
    #[task(binds = UART0RX, priority = 2, local = [received])]
    fn uart0_rx(cx: uart0_rx::Context) {
        uart::take_received(cx.local.received);
    }

    /// One event a millisecond, every priority in turn, and a legacy one
    /// after every tenth, until the log holds `TOTAL`.
    #[task(priority = 1, shared = [engine], local = [sensor])]
    async fn sensor(mut cx: sensor::Context) {
        let s = cx.local.sensor;
        let mut buf = [0u8; SLOT];
        loop {
            let more = cx.shared.engine.lock(|p| {
                if p.sink().log.next_offset() >= TOTAL {
                    return false;
                }
                let id = match p.sink_mut().retry.pop_front() {
                    Some(id) => id,
                    None => {
                        s.seq += 1;
                        (DEVICE_ID << 48) | ((s.base + 1) << 20) | s.seq
                    }
                };
                let n = sensor_frame(&mut buf, id);
                feed(p, 0, &mut s.v1, &buf[..n]);
                s.made += 1;
                if s.made.is_multiple_of(LEGACY_EVERY) {
                    let mut l = [0u8; 64];
                    let n = legacy_frame(&mut l, s.made / LEGACY_EVERY);
                    feed(p, 1, &mut s.legacy, &l[..n]);
                }
                true
            });
            if !more {
                return;
            }
            Mono::delay(1.millis()).await;
        }
    }

    /// Runs the pipeline and the uplink each millisecond; ends the run
    /// once every event the log holds is delivered.
    #[task(priority = 1, shared = [engine], local = [uplink, link, painted])]
    async fn uplink(mut cx: uplink::Context) {
        let (up, link, painted) = (cx.local.uplink, cx.local.link, *cx.local.painted);
        let started = now_ms();
        loop {
            let now = now_ms();
            cx.shared.engine.lock(|p| {
                let making = p.sink().log.next_offset() < TOTAL;
                p.poll();
                if !making {
                    // Close the last batch windows.
                    p.drain();
                }
                let restarts = up.stats().restarts;
                if let Err(e) = up.poll(&mut p.sink_mut().log, link, now) {
                    defmt::error!("appliance: flash: {}", e);
                    exit(false)
                }
                if up.stats().restarts > restarts {
                    defmt::info!(
                        "appliance: the link was silent; sending again from offset {} ({} timeouts so far)",
                        up.delivered(),
                        up.stats().timeouts
                    );
                }
                let end = p.sink().log.next_offset();
                if !making && up.delivered() >= end && up.in_flight() == 0 {
                    finish(end, up.stats(), now.saturating_sub(started), painted);
                }
            });
            Mono::delay(1.millis()).await;
        }
    }
}

/// Prints the run's figures and RAM, and ends it.
fn finish(
    end: u64,
    u: eventstream_core::uplink::UplinkStats,
    ms: u64,
    painted: (usize, usize),
) -> ! {
    let ms = ms.max(1);
    defmt::info!(
        "appliance: done: {} events in the log, all delivered; this boot sent {} frames ({} again) in {} ms: {} events/s, {} bytes/event; acks stored {} duplicate {} refused {}; {} timeouts, {} restarts",
        end,
        u.sent,
        u.resent,
        ms,
        u.sent * 1000 / ms,
        u.bytes / u.sent.max(1),
        u.stored,
        u.duplicates,
        u.refused,
        u.timeouts,
        u.restarts
    );
    let stack = common::stack_used(painted, common::stack_top());
    let statics = painted.0 - 0x2000_0000;
    defmt::info!(
        "RAM: statics {} B + stack {} B = {} B (budget {} B)",
        statics,
        stack,
        statics + stack,
        RAM_BUDGET
    );
    if statics + stack > RAM_BUDGET {
        defmt::error!("appliance: RAM over its budget");
    }
    exit(statics + stack <= RAM_BUDGET)
}

/// The pipeline over the statics.
fn build(
    log: Log,
    record_buf: &'static mut [u8; RECORD],
    windows: &'static mut StaticBatchWindows<Event<'static>, 8, 32>,
) -> Option<Engine> {
    let (Some(acquirer), Some(windows)) = (
        POOL.acquirer(),
        windows.windows(BatchConfig {
            max_events: BATCH_EVENTS as u32,
            max_age_ns: 100_000_000,
        }),
    ) else {
        return None;
    };
    let (Some(a), Some(b), Some(c)) = (RT_IN.split(), TX_IN.split(), BATCH_IN.split()) else {
        return None;
    };
    Pipeline::new(Parts {
        limits: LIMITS,
        router: &ROUTER,
        acquirer,
        class_rings: [a, b, c],
        dedup: DEDUP.table(),
        windows,
        record_buf: &mut record_buf[..],
        registry: &REGISTRY,
        clock: BoardClock,
        sink: FlashSink {
            log,
            retry: heapless::Deque::new(),
        },
        hook: (),
        when_full: WhenFull::Backpressure,
    })
    .ok()
}
