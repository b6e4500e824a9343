//! The subject template (`--forward-subject`) and the escaping of topics
//! into subject tokens (docs/scale-out.md, "Subjects").
//!
//! A NATS subject is tokens split by `.`; a token must not be empty nor
//! hold `.`, `*`, `>` or white space. A topic's bytes outside
//! `[A-Za-z0-9_-]` are written `%HH` (upper-case hex), so a topic is always
//! one token and its bytes can be read back; the empty topic is `%`.

use std::fmt::Write as _;

/// One piece of a template.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Text(String),
    Class,
    Topic,
    Priority,
    Partition,
}

/// A parsed `--forward-subject`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    pieces: Vec<Piece>,
    /// The subjects a stream needs to take every subject the template
    /// makes: each token that holds a placeholder becomes `*`.
    filter: String,
}

/// Whether `c` may stand in a subject as it is.
fn plain(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'-'
}

/// Appends the subject token of `topic` to `out`.
pub fn escape_topic(out: &mut String, topic: &[u8]) {
    if topic.is_empty() {
        out.push('%');
        return;
    }
    for &c in topic {
        if plain(c) {
            out.push(c as char);
        } else {
            let _ = write!(out, "%{c:02X}");
        }
    }
}

impl Template {
    /// Parses a template; errors say what is wrong.
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix('{') {
                let close = after.find('}').ok_or("a '{' without its '}'")?;
                pieces.push(match &after[..close] {
                    "class" => Piece::Class,
                    "topic" => Piece::Topic,
                    "priority" => Piece::Priority,
                    "partition" => Piece::Partition,
                    other => {
                        return Err(format!(
                            "unknown placeholder {{{other}}} (known: {{class}} {{topic}} {{priority}} {{partition}})"
                        ))
                    }
                });
                rest = &after[close + 1..];
            } else {
                let end = rest.find('{').unwrap_or(rest.len());
                let lit = &rest[..end];
                if lit.contains('}') {
                    return Err("a '}' without its '{'".into());
                }
                if let Some(c) = lit
                    .chars()
                    .find(|&c| c == '*' || c == '>' || c.is_whitespace() || c.is_control())
                {
                    return Err(format!("{c:?} cannot stand in a subject"));
                }
                pieces.push(Piece::Text(lit.to_string()));
                rest = &rest[end..];
            }
        }
        // Tokens: none empty; one with a placeholder is `*` in the filter.
        let mut filter = Vec::new();
        let mut token = String::new();
        let mut wild = false;
        let mut close = |token: &mut String, wild: &mut bool| -> Result<(), String> {
            if token.is_empty() && !*wild {
                return Err("an empty token (two dots, or a dot at an end)".into());
            }
            filter.push(if *wild {
                "*".to_string()
            } else {
                token.clone()
            });
            token.clear();
            *wild = false;
            Ok(())
        };
        for p in &pieces {
            match p {
                Piece::Text(t) => {
                    let mut parts = t.split('.');
                    if let Some(first) = parts.next() {
                        token.push_str(first);
                    }
                    for part in parts {
                        close(&mut token, &mut wild)?;
                        token.push_str(part);
                    }
                }
                _ => wild = true,
            }
        }
        close(&mut token, &mut wild)?;
        Ok(Template {
            pieces,
            filter: filter.join("."),
        })
    }

    /// The stream subject that takes every subject this template makes.
    pub fn filter(&self) -> &str {
        &self.filter
    }

    /// Writes the subject of one event into `out` (cleared first).
    pub fn render(
        &self,
        out: &mut String,
        class: &str,
        topic: &[u8],
        priority: &str,
        partition: u32,
    ) {
        out.clear();
        for p in &self.pieces {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Class => out.push_str(class),
                Piece::Topic => escape_topic(out, topic),
                Piece::Priority => out.push_str(priority),
                Piece::Partition => {
                    let _ = write!(out, "{partition}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_template_makes_one_token_per_field() {
        let t = Template::parse("events.{class}.{topic}").unwrap();
        assert_eq!(t.filter(), "events.*.*");
        let mut s = String::new();
        t.render(&mut s, "batch", b"orders.eu west*>", "HIGH", 3);
        assert_eq!(s, "events.batch.orders%2Eeu%20west%2A%3E");
        t.render(&mut s, "realtime", b"", "LOW", 0);
        assert_eq!(s, "events.realtime.%");
        t.render(&mut s, "realtime", b"a_b-C9", "LOW", 0);
        assert_eq!(s, "events.realtime.a_b-C9");
    }

    #[test]
    fn placeholders_inside_tokens_and_the_rest() {
        let t = Template::parse("es.p{partition}.{priority}-{class}.x").unwrap();
        assert_eq!(t.filter(), "es.*.*.x");
        let mut s = String::new();
        t.render(&mut s, "transactional", b"t", "CRITICAL", 12);
        assert_eq!(s, "es.p12.CRITICAL-transactional.x");
    }

    #[test]
    fn bad_templates_are_refused() {
        for bad in [
            "", "a..b", ".a", "a.", "a.{nope}", "a.{class", "a}", "a.*", "a.>", "a b",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn escaping_is_reversible() {
        let topic: Vec<u8> = (0u8..=255).collect();
        let mut s = String::new();
        escape_topic(&mut s, &topic);
        let mut back = Vec::new();
        let b = s.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                back.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 3;
            } else {
                assert!(plain(b[i]));
                back.push(b[i]);
                i += 1;
            }
        }
        assert_eq!(back, topic);
    }
}
