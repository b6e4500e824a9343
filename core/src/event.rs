//! Event vocabulary: priorities, processing classes and event ids.
//!
//! Plain value types; a `Priority` or `Class` can only hold a value the
//! protocol defines (PROTOCOL.md sections 2 and 5).

/// Producer-chosen event id, the dedup key.
pub type EventId = u64;

/// Event priority as carried on the wire (PROTOCOL.md section 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u8)]
pub enum Priority {
    /// 0: bulk traffic, aggregated into batch records.
    Batch = 0,
    /// 1: transactional, low urgency.
    Low = 1,
    /// 2: transactional.
    Medium = 2,
    /// 3: realtime.
    High = 3,
    /// 4: realtime, most urgent.
    Critical = 4,
}

impl Priority {
    /// All priorities, lowest first.
    pub const ALL: [Priority; 5] = [
        Priority::Batch,
        Priority::Low,
        Priority::Medium,
        Priority::High,
        Priority::Critical,
    ];

    /// The priority with wire code `code`, or `None` above 4.
    #[inline]
    pub const fn from_u8(code: u8) -> Option<Priority> {
        match code {
            0 => Some(Priority::Batch),
            1 => Some(Priority::Low),
            2 => Some(Priority::Medium),
            3 => Some(Priority::High),
            4 => Some(Priority::Critical),
            _ => None,
        }
    }

    /// The wire code.
    #[inline]
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// Lower-case name, as `inspect --json` prints it.
    pub const fn name(self) -> &'static str {
        match self {
            Priority::Batch => "batch",
            Priority::Low => "low",
            Priority::Medium => "medium",
            Priority::High => "high",
            Priority::Critical => "critical",
        }
    }

    /// The class this priority routes to (PROTOCOL.md section 5).
    #[inline]
    pub const fn class(self) -> Class {
        match self {
            Priority::Critical | Priority::High => Class::Realtime,
            Priority::Medium | Priority::Low => Class::Transactional,
            Priority::Batch => Class::Batch,
        }
    }
}

/// The processor an event is routed to; also the `class` byte of a log
/// record (PROTOCOL.md section 6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u8)]
pub enum Class {
    /// Low latency, dedup check only.
    Realtime = 0,
    /// Exactly once inside the dedup window.
    Transactional = 1,
    /// Aggregated per (topic, partition) window.
    Batch = 2,
}

impl Class {
    /// All classes in code order.
    pub const ALL: [Class; 3] = [Class::Realtime, Class::Transactional, Class::Batch];

    /// The class with record code `code`, or `None` above 2.
    #[inline]
    pub const fn from_u8(code: u8) -> Option<Class> {
        match code {
            0 => Some(Class::Realtime),
            1 => Some(Class::Transactional),
            2 => Some(Class::Batch),
            _ => None,
        }
    }

    /// The record code.
    #[inline]
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// Index 0..3, for per-class arrays.
    #[inline]
    pub const fn index(self) -> usize {
        self as usize
    }

    /// Lower-case name, as `inspect --json` and metrics print it.
    pub const fn name(self) -> &'static str {
        match self {
            Class::Realtime => "realtime",
            Class::Transactional => "transactional",
            Class::Batch => "batch",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_route() {
        for p in Priority::ALL {
            assert_eq!(Priority::from_u8(p.code()), Some(p));
        }
        assert_eq!(Priority::from_u8(5), None);
        assert_eq!(Priority::Critical.class(), Class::Realtime);
        assert_eq!(Priority::High.class(), Class::Realtime);
        assert_eq!(Priority::Medium.class(), Class::Transactional);
        assert_eq!(Priority::Low.class(), Class::Transactional);
        assert_eq!(Priority::Batch.class(), Class::Batch);
        for c in Class::ALL {
            assert_eq!(Class::from_u8(c.code()), Some(c));
        }
        assert_eq!(Class::from_u8(3), None);
    }
}
