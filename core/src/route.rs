//! Routing: an event's class follows from its priority (PROTOCOL.md section
//! 5), after a topic table that can only raise priorities.
//!
//! Costs: no allocation; with an empty table routing is one match; with
//! entries, one FNV hash of the topic and a lookup in a fixed-capacity map.

use heapless::index_map::FnvIndexMap;

use crate::event::{Class, Priority};

/// Longest topic the table holds (the protocol's limit).
pub const MAX_TOPIC: usize = 255;

/// Why an entry could not be added.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum TopicError {
    /// Empty or longer than 255 bytes.
    BadTopic,
    /// The table holds `N` topics already.
    Full,
}

/// Raise-only topic priorities for up to `N` topics (`N` a power of two):
/// `--topic-priority T=P` and the original's `topics.conf`.
pub struct TopicTable<const N: usize> {
    map: FnvIndexMap<heapless::Vec<u8, MAX_TOPIC>, Priority, N>,
}

impl<const N: usize> TopicTable<N> {
    /// An empty table.
    pub const fn new() -> Self {
        Self {
            map: FnvIndexMap::new(),
        }
    }

    /// Sets the floor priority of `topic`; a second entry for the same topic
    /// keeps the higher of the two.
    pub fn set(&mut self, topic: &[u8], priority: Priority) -> Result<(), TopicError> {
        let key = heapless::Vec::from_slice(topic).map_err(|_| TopicError::BadTopic)?;
        if key.is_empty() {
            return Err(TopicError::BadTopic);
        }
        match self.map.get_mut(&key) {
            Some(p) => {
                *p = (*p).max(priority);
                Ok(())
            }
            None => self
                .map
                .insert(key, priority)
                .map(|_| ())
                .map_err(|_| TopicError::Full),
        }
    }

    /// Topics in the table.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// No topic in the table.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The priority an event of `topic` sent with `priority` is handled at:
    /// the higher of the two.
    #[inline]
    pub fn effective(&self, topic: &[u8], priority: Priority) -> Priority {
        if self.map.is_empty() {
            return priority;
        }
        let Ok(key) = heapless::Vec::<u8, MAX_TOPIC>::from_slice(topic) else {
            return priority;
        };
        match self.map.get(&key) {
            Some(floor) => priority.max(*floor),
            None => priority,
        }
    }

    /// The class an event of `topic` sent with `priority` routes to.
    #[inline]
    pub fn route(&self, topic: &[u8], priority: Priority) -> Class {
        self.effective(topic, priority).class()
    }
}

impl<const N: usize> Default for TopicTable<N> {
    fn default() -> Self {
        Self::new()
    }
}

/// Parses one `topic:PRIORITY` (topics.conf) or `topic=PRIORITY` (flag)
/// line; the priority is a name (any case) or its number. `None` for blank
/// lines and `#` comments.
pub fn parse_topic_line(line: &str) -> Option<Result<(&str, Priority), &str>> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let Some((topic, prio)) = line.rsplit_once([':', '=']) else {
        return Some(Err(line));
    };
    let topic = topic.trim();
    let prio = prio.trim();
    let p = Priority::ALL
        .into_iter()
        .find(|p| p.name().eq_ignore_ascii_case(prio) || prio.parse::<u8>() == Ok(p.code()));
    match p {
        Some(p) if !topic.is_empty() => Some(Ok((topic, p))),
        _ => Some(Err(line)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_only_raises() {
        let mut t: TopicTable<8> = TopicTable::new();
        assert_eq!(t.route(b"alerts", Priority::Batch), Class::Batch);
        t.set(b"alerts", Priority::High).unwrap();
        t.set(b"alerts", Priority::Low).unwrap();
        assert_eq!(t.effective(b"alerts", Priority::Batch), Priority::High);
        assert_eq!(
            t.effective(b"alerts", Priority::Critical),
            Priority::Critical
        );
        assert_eq!(t.route(b"alerts", Priority::Low), Class::Realtime);
        assert_eq!(t.route(b"other", Priority::Low), Class::Transactional);
        assert_eq!(t.set(b"", Priority::High), Err(TopicError::BadTopic));
        assert_eq!(
            t.set(&[b'x'; 256], Priority::High),
            Err(TopicError::BadTopic)
        );
    }

    #[test]
    fn table_capacity_is_enforced() {
        let mut t: TopicTable<2> = TopicTable::new();
        t.set(b"a", Priority::Low).unwrap();
        t.set(b"b", Priority::Low).unwrap();
        assert_eq!(t.set(b"c", Priority::Low), Err(TopicError::Full));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn topic_lines_parse_like_topics_conf() {
        assert_eq!(
            parse_topic_line("orders:HIGH"),
            Some(Ok(("orders", Priority::High)))
        );
        assert_eq!(
            parse_topic_line(" a/b = critical "),
            Some(Ok(("a/b", Priority::Critical)))
        );
        assert_eq!(parse_topic_line("x:2"), Some(Ok(("x", Priority::Medium))));
        assert_eq!(parse_topic_line("# comment"), None);
        assert_eq!(parse_topic_line("   "), None);
        assert_eq!(parse_topic_line("x:URGENT"), Some(Err("x:URGENT")));
        assert_eq!(parse_topic_line("novalue"), Some(Err("novalue")));
    }
}
