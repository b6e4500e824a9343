//! Consumer groups (PROTOCOL.md section 7.4): each group's committed
//! offset, kept in `<data>/groups`, and the commit thread (`es-commit`)
//! that makes commits durable off the readers' loop, many per fsync.
//!
//! The file is text, replaced whole on every save (written to
//! `groups.tmp`, fsynced, renamed, the directory fsynced), so it is always
//! the old or the new one: a line `# eventstream consumer groups 1`, then
//! `group NAME OFFSET TOUCHED_UNIX_MS` per group, then `crc HEX`, the
//! CRC-32C of every byte before that line. A file that does not check
//! stops start-up with its path named (it is not guessed at).
//!
//! A commit is answered once the group's new offset is in the file and
//! the log up to that offset is durable: the commit thread fsyncs the log
//! itself when the policy has not yet (the same fsync as the sync
//! thread's, `SyncTargets::sync`).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::shared::{Phase, Shared};
use crate::storage::{locked, LogTail, SyncTargets};
use crate::sys::{wall_ns, EventFd, Parker};

/// The session id of the server's own readers' groups (the forwarder's
/// `_forward`); read sessions count up from 1 and never reach it.
pub const FORWARD_SESSION: u64 = u64::MAX;

/// Whether a group is the server's own (`_` names): it never expires and
/// its offset never goes back.
pub fn reserved(name: &str) -> bool {
    name.starts_with('_')
}

/// The file's name in the data directory.
pub const GROUPS_FILE: &str = "groups";
const HEADER: &str = "# eventstream consumer groups 1\n";

/// One group.
#[derive(Clone, Debug, Default)]
pub struct Group {
    /// The committed offset (None: never committed).
    pub committed: Option<u64>,
    /// Unix ms of the last commit or session start.
    pub touched_ms: u64,
    /// The open session's id.
    pub session: Option<u64>,
    /// Commits of it taken by the commit thread and not yet answered.
    pub inflight: u32,
}

/// A commit for the commit thread.
pub struct CommitReq {
    /// The session that asked.
    pub session: u64,
    /// Its group.
    pub group: String,
    /// The offset.
    pub offset: u64,
}

/// A commit's outcome, back to the reader thread.
pub struct CommitDone {
    /// The session that asked.
    pub session: u64,
    /// Its group.
    pub group: String,
    /// The offset.
    pub offset: u64,
    /// Durable (else the session gets CLOSING STORAGE_FAILED).
    pub ok: bool,
}

/// The groups, shared by the reader thread, the commit thread and
/// `/metrics`.
pub struct Groups {
    state: Mutex<BTreeMap<String, Group>>,
    queue: Mutex<Vec<CommitReq>>,
    done: Mutex<Vec<CommitDone>>,
    parker: Parker,
    /// Held across a save and its apply (the commit thread, and the
    /// forwarder's last save at shutdown).
    save_lock: Mutex<()>,
    dir: PathBuf,
    max_groups: usize,
    expiry: Duration,
}

fn now_ms() -> u64 {
    wall_ns() / 1_000_000
}

impl Groups {
    /// Loads `<dir>/groups` (none: no groups), forgetting the expired ones.
    pub fn load(dir: &Path, max_groups: usize, expiry: Duration) -> Result<Groups, String> {
        let path = dir.join(GROUPS_FILE);
        let mut groups = match fs::read_to_string(&path) {
            Ok(text) => parse(&text).map_err(|e| {
                format!(
                    "{}: {e}; the consumer groups cannot be trusted (move the file away to start without them)",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let now = now_ms();
        let expiry_ms = expiry.as_millis() as u64;
        groups.retain(|n, g| reserved(n) || now.saturating_sub(g.touched_ms) <= expiry_ms);
        Ok(Groups {
            state: Mutex::new(groups),
            queue: Mutex::new(Vec::new()),
            done: Mutex::new(Vec::new()),
            parker: Parker::new(),
            save_lock: Mutex::new(()),
            dir: dir.to_path_buf(),
            max_groups,
            expiry,
        })
    }

    /// The groups (locked).
    pub fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Group>> {
        locked(&self.state)
    }

    /// Whether a new group fits under the cap (after forgetting expired
    /// ones without a session).
    pub fn room_for_new(&self, groups: &mut BTreeMap<String, Group>) -> bool {
        if groups.len() < self.max_groups {
            return true;
        }
        let now = now_ms();
        let expiry_ms = self.expiry.as_millis() as u64;
        groups.retain(|n, g| {
            reserved(n)
                || g.session.is_some()
                || g.inflight > 0
                || now.saturating_sub(g.touched_ms) <= expiry_ms
        });
        groups.len() < self.max_groups
    }

    /// Queues a commit for the commit thread.
    pub fn commit(&self, req: CommitReq) {
        if let Some(g) = self.lock().get_mut(&req.group) {
            g.inflight += 1;
        }
        locked(&self.queue).push(req);
        self.parker.wake();
    }

    /// The commits answered since the last call.
    pub fn take_done(&self, into: &mut Vec<CommitDone>) {
        into.append(&mut locked(&self.done));
    }

    /// Committed offsets by group, for `/metrics`.
    pub fn committed(&self) -> Vec<(String, u64)> {
        self.lock()
            .iter()
            .filter_map(|(n, g)| g.committed.map(|c| (n.clone(), c)))
            .collect()
    }

    /// Saves `offset` for the server's own group `name` now, on the
    /// caller's thread (the forwarder at shutdown, when the commit thread
    /// may be gone).
    pub fn commit_now(&self, name: &str, offset: u64) -> io::Result<()> {
        let _saving = locked(&self.save_lock);
        let batch = [CommitReq {
            session: FORWARD_SESSION,
            group: name.to_string(),
            offset,
        }];
        let now = now_ms();
        let mut snapshot = self.lock().clone();
        apply(&mut snapshot, &batch, now);
        self.save(&snapshot)?;
        apply(&mut self.lock(), &batch, now);
        Ok(())
    }

    /// Wakes the commit thread (shutdown).
    pub fn wake(&self) {
        self.parker.wake();
    }

    fn save(&self, groups: &BTreeMap<String, Group>) -> io::Result<()> {
        let mut text = String::from(HEADER);
        for (name, g) in groups {
            if let Some(c) = g.committed {
                text.push_str(&format!("group {name} {c} {}\n", g.touched_ms));
            }
        }
        let crc = eventstream_core::crc32c::checksum(text.as_bytes());
        text.push_str(&format!("crc {crc:08x}\n"));
        crate::storage::replace_durably(&self.dir, GROUPS_FILE, text.as_bytes())
    }
}

fn parse(text: &str) -> Result<BTreeMap<String, Group>, String> {
    let Some(body_end) = text.rfind("crc ") else {
        return Err("no crc line".into());
    };
    let (body, crc_line) = text.split_at(body_end);
    let want = u32::from_str_radix(crc_line.trim_start_matches("crc ").trim(), 16)
        .map_err(|_| "bad crc line".to_string())?;
    if eventstream_core::crc32c::checksum(body.as_bytes()) != want || !body.starts_with(HEADER) {
        return Err("checksum or header mismatch".into());
    }
    let mut groups = BTreeMap::new();
    for line in body.lines().skip(1) {
        let f: Vec<&str> = line.split(' ').collect();
        match f.as_slice() {
            ["group", name, offset, touched]
                if eventstream_core::wire::read::server_group_ok(name.as_bytes()) =>
            {
                let (Ok(offset), Ok(touched)) = (offset.parse(), touched.parse()) else {
                    return Err(format!("bad line {line:?}"));
                };
                groups.insert(
                    name.to_string(),
                    Group {
                        committed: Some(offset),
                        touched_ms: touched,
                        session: None,
                        inflight: 0,
                    },
                );
            }
            _ => return Err(format!("bad line {line:?}")),
        }
    }
    Ok(groups)
}

/// Runs the commit thread until the stop: takes every queued commit,
/// makes the log durable up to the highest, saves the file once, answers
/// them all and wakes the reader thread (`readers`).
pub fn run_commits(
    groups: Arc<Groups>,
    tail: Arc<LogTail>,
    targets: Arc<SyncTargets>,
    readers: Arc<EventFd>,
    shared: Arc<Shared>,
) {
    let mut batch = Vec::new();
    loop {
        groups.parker.park(Some(Duration::from_secs(1)), || {
            !locked(&groups.queue).is_empty() || shared.phase() == Phase::Stop
        });
        std::mem::swap(&mut batch, &mut *locked(&groups.queue));
        if batch.is_empty() {
            if shared.phase() == Phase::Stop {
                return;
            }
            continue;
        }
        {
            // A fenced session's commits not yet begun are dropped.
            let mut state = groups.lock();
            batch.retain(|c| {
                let Some(g) = state.get_mut(&c.group) else {
                    return false;
                };
                let mine = g.session == Some(c.session);
                if !mine {
                    g.inflight = g.inflight.saturating_sub(1);
                }
                mine
            });
        }
        if batch.is_empty() {
            continue;
        }
        let highest = batch.iter().map(|c| c.offset).max().unwrap_or(0);
        let mut ok = true;
        if tail.durable.load().offset < highest {
            // Everything appended before the fsync began is durable after
            // it, and the written end read now is at least `highest`.
            let position = tail.written.load();
            match targets.sync() {
                Ok(()) => tail.publish_durable(position),
                Err(e) => {
                    eprintln!("eventstream: a commit's log fsync failed: {e}");
                    ok = false;
                }
            }
        }
        let now = now_ms();
        if ok {
            // Saved first, applied once durable.
            let _saving = locked(&groups.save_lock);
            let mut snapshot = groups.lock().clone();
            apply(&mut snapshot, &batch, now);
            match groups.save(&snapshot) {
                Ok(()) => apply(&mut groups.lock(), &batch, now),
                Err(e) => {
                    eprintln!("eventstream: cannot save the consumer groups: {e}");
                    ok = false;
                }
            }
        }
        let mut done = locked(&groups.done);
        done.extend(batch.drain(..).map(|c| CommitDone {
            session: c.session,
            group: c.group,
            offset: c.offset,
            ok,
        }));
        drop(done);
        readers.notify();
    }
}

fn apply(groups: &mut BTreeMap<String, Group>, batch: &[CommitReq], now: u64) {
    for c in batch {
        if let Some(g) = groups.get_mut(&c.group) {
            if reserved(&c.group) && g.committed.is_some_and(|o| o > c.offset) {
                continue;
            }
            g.committed = Some(c.offset);
            g.touched_ms = now;
        }
    }
}
