//! The appliance: an image shaped like product firmware. It collects events
//! from its own sources (a sensor that makes one event of every priority
//! in turn each millisecond, and a byte stream in the original
//! EventStreamCore's legacy format), runs them through the core's pipeline
//! (dedup, batch windows) into a flash log that survives power cuts, and
//! streams the log to `eventstream serve` through UART0, exactly once for
//! transactional events.
//!
//! Under QEMU the UART is a TCP socket (`-serial tcp:HOST:PORT,reconnect=1`)
//! and the flash log lives in the board's PSRAM at 0x2100_0000, which QEMU
//! backs with a file (`-object memory-backend-file,...`), so a restart of
//! QEMU is a power cut the log recovers from. It makes `TOTAL` events over
//! all its boots (the log's next offset counts them), waits until every
//! one is delivered, prints its figures and exits through semihosting.
#![no_std]
#![no_main]

#[path = "../common.rs"]
mod common;
mod uart;

use core::sync::atomic::{AtomicU32, Ordering};

use common::{paint_stack, stack_used, TakeOnce};
use cortex_m::peripheral::syst::SystClkSource;
use cortex_m_rt::{entry, exception};
use cortex_m_semihosting::debug;
use defmt_semihosting as _;
use eventstream_core::batch::{BatchConfig, StaticBatchWindows};
use eventstream_core::dedup::{DedupConfig, DedupTable, FullPolicy as DedupFull};
use eventstream_core::flash::{FlashLog, FullPolicy, MemFlash};
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
const SLOTS: usize = 24;
const SLOT: usize = 256;
/// Events per batch window.
const BATCH_EVENTS: usize = 8;
/// One record: a full batch of maximal frames.
const RECORD: usize = RECORD_HEADER_LEN + BATCH_EVENTS * SLOT;
/// The flash log: 16 sectors of 4 KiB in PSRAM.
const SECTOR: usize = 4096;
const SECTORS: usize = 16;
const FLASH_BASE: usize = 0x2100_0000;
/// Events the appliance makes over all its boots.
const TOTAL: u64 = 3000;
/// One legacy event after every this many sensor events.
const LEGACY_EVERY: u32 = 10;
/// RAM the image may use, statics and stack.
const RAM_BUDGET: usize = 48 * 1024;
const WINDOW_MS: u32 = 60_000;
/// Frames up to a pool slot, topics up to 32 bytes.
const LIMITS: Limits = match Limits::new(SLOT as u32, 32) {
    Ok(l) => l,
    Err(_) => Limits::DEFAULT,
};

static POOL: EventPool<SLOTS, SLOT> = EventPool::new();
static RT_IN: Ring<Event<'static>, 8> = Ring::new();
static TX_IN: Ring<Event<'static>, 8> = Ring::new();
static BATCH_IN: Ring<Event<'static>, 8> = Ring::new();
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
}));
static REGISTRY: Registry<COARSE> = Registry::empty();
static ROUTER: TopicTable<4> = TopicTable::new();
/// Milliseconds since boot (SysTick).
static MS: AtomicU32 = AtomicU32::new(0);

#[exception]
fn SysTick() {
    MS.fetch_add(1, Ordering::Relaxed);
}

fn now_ms() -> u64 {
    u64::from(MS.load(Ordering::Relaxed))
}

/// The board's clock: no real-time clock, so wall time is a fixed epoch
/// plus the time since boot.
struct BoardClock;

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
struct FlashSink {
    log: Log,
    /// Sensor events refused for now (the flash was full): made again.
    retry: heapless::Deque<u64, 64>,
    stored_acks: u32,
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
        match ack.status {
            Status::Stored | Status::Duplicate => self.stored_acks += 1,
            Status::Rejected if ack.reason != Reason::BadTopic => {
                let _ = self.retry.push_back(ack.event_id);
            }
            _ => {}
        }
    }
}

type Engine = Pipeline<'static, 'static, 'static, TopicTable<4>, BoardClock, FlashSink, (), COARSE>;

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
fn feed(p: &mut Engine, conn: u32, dec: &mut StreamDecoder<[u8; SLOT]>, mut bytes: &[u8]) {
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

#[entry]
fn main() -> ! {
    let top = common::stack_top();
    let painted = paint_stack();
    let ok = run();
    let stack = stack_used(painted, top);
    let statics = painted.0 - 0x2000_0000;
    defmt::info!(
        "RAM: statics {} B + stack {} B = {} B (budget {} B)",
        statics,
        stack,
        statics + stack,
        RAM_BUDGET
    );
    if ok && statics + stack <= RAM_BUDGET {
        debug::exit(debug::EXIT_SUCCESS);
    } else {
        defmt::error!("appliance: failed, or RAM over its budget");
        debug::exit(debug::EXIT_FAILURE);
    }
    loop {
        cortex_m::asm::bkpt();
    }
}

/// Boots the appliance and runs it until every event is delivered.
fn run() -> bool {
    let Some(mut cp) = cortex_m::Peripherals::take() else {
        return false;
    };
    // 1 ms ticks of the 25 MHz system clock.
    cp.SYST.set_clock_source(SystClkSource::Core);
    cp.SYST.set_reload(25_000 - 1);
    cp.SYST.clear_current();
    cp.SYST.enable_interrupt();
    cp.SYST.enable_counter();

    // The record buffer reads the flash log at boot, then builds records.
    let (Some(scan), Some(uplink)) = (RECORD_BUF.take(), UPLINK.take()) else {
        return false;
    };
    // SAFETY: the PSRAM at FLASH_BASE is mapped on this board, and nothing
    // else in the image uses it (the linker places nothing there); this
    // is the only reference made to it.
    let mem = unsafe { core::slice::from_raw_parts_mut(FLASH_BASE as *mut u8, SECTOR * SECTORS) };
    let mut log: Log = match FlashLog::open(MemFlash::new(mem), FullPolicy::StopAccepting, scan) {
        Ok(l) => l,
        Err(e) => {
            defmt::error!("appliance: flash log: {}", e);
            return false;
        }
    };
    let s = log.stats();
    let wall = BoardClock.wall_ns();
    let rebuilt = log
        .rebuild_dedup(DEDUP.table(), u64::from(WINDOW_MS), wall, now_ms(), scan)
        .unwrap_or(0);
    defmt::info!(
        "appliance: boot: log at offset {}, {} undelivered records, torn tail {}, {} ids in the dedup table",
        log.next_offset(),
        s.recovered_records,
        s.torn_tail,
        rebuilt
    );
    let boot_base = log.next_offset();
    let Some(mut p) = build(log, scan) else {
        defmt::error!("appliance: the pipeline's parts were taken");
        return false;
    };
    let mut link = uart::Uart::take();
    let mut sensor = StreamDecoder::new([0u8; SLOT], LIMITS).ok();
    let mut legacy = StreamDecoder::new([0u8; SLOT], LIMITS).ok();
    let (Some(sensor), Some(legacy)) = (sensor.as_mut(), legacy.as_mut()) else {
        return false;
    };
    // Ids: the boot's base (the log's next offset at boot, which every
    // stored event of earlier boots is below) and a counter.
    let mut seq: u64 = 0;
    let mut made = 0u32;
    let mut next_tick = now_ms();
    let started = now_ms();
    let mut buf = [0u8; SLOT];
    loop {
        let now = now_ms();
        let making = p.sink().log.next_offset() < TOTAL;
        if making && now >= next_tick {
            next_tick = now + 1;
            let id = match p.sink_mut().retry.pop_front() {
                Some(id) => id,
                None => {
                    seq += 1;
                    ((boot_base + 1) << 20) | seq
                }
            };
            let n = sensor_frame(&mut buf, id);
            feed(&mut p, 0, sensor, &buf[..n]);
            made += 1;
            if made.is_multiple_of(LEGACY_EVERY) {
                let mut l = [0u8; 64];
                let n = legacy_frame(&mut l, made / LEGACY_EVERY);
                feed(&mut p, 1, legacy, &l[..n]);
            }
        }
        p.poll();
        if !making {
            // Close the last batch windows.
            p.drain();
        }
        let log = &mut p.sink_mut().log;
        let restarts = uplink.stats().restarts;
        if let Err(e) = uplink.poll(log, &mut link, now) {
            defmt::error!("appliance: flash: {}", e);
            return false;
        }
        if uplink.stats().restarts > restarts {
            defmt::info!(
                "appliance: the link was silent; sending again from offset {} ({} timeouts so far)",
                uplink.delivered(),
                uplink.stats().timeouts
            );
        }
        let end = p.sink().log.next_offset();
        if !making && uplink.delivered() >= end && uplink.in_flight() == 0 {
            let u = uplink.stats();
            let secs = (now - started).max(1);
            defmt::info!(
                "appliance: done: {} events in the log, all delivered; this boot sent {} frames ({} again) in {} ms: {} events/s, {} bytes/event; acks stored {} duplicate {} refused {}; {} timeouts, {} restarts",
                end,
                u.sent,
                u.resent,
                secs,
                u.sent * 1000 / secs,
                u.bytes / u.sent.max(1),
                u.stored,
                u.duplicates,
                u.refused,
                u.timeouts,
                u.restarts
            );
            return true;
        }
    }
}

/// The pipeline over the statics.
fn build(log: Log, record_buf: &'static mut [u8; RECORD]) -> Option<Engine> {
    let windows = WINDOWS.take()?;
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
            stored_acks: 0,
        },
        hook: (),
        when_full: WhenFull::Backpressure,
    })
    .ok()
}
