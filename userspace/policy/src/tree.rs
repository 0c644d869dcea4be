//! A YAML document as a tree of positioned nodes, built from saphyr-parser's event stream.
//!
//! Validation walks this tree rather than deserializing into types, so that every problem
//! (unknown fields and wrong types included) is found in one pass and reported at the line
//! and column the parser saw. Limits are enforced while reading, before anything recurses:
//! the tree is built with an explicit stack and never gets deeper than [`MAX_DEPTH`].

use std::fmt;

use saphyr_parser::{Event, Parser, ScalarStyle, ScanError};

/// Nesting of sequences and mappings; a policy needs 5.
pub const MAX_DEPTH: usize = 64;
/// Policies are a few kilobytes to a few megabytes (generated ones).
pub const MAX_FILE_BYTES: usize = 32 << 20;

/// A 1-based line and column; line 0 means "no position" (e.g. the file could not be read).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

#[derive(Debug)]
pub struct Node {
    pub pos: Pos,
    pub kind: Kind,
}

#[derive(Debug)]
pub enum Kind {
    /// The text and whether it was written plain (unquoted, untagged), so that it may be a
    /// number, a boolean or null.
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    /// Entries in document order; keys are nodes (YAML allows any node as a key).
    Map(Vec<(Node, Node)>),
}

/// What a scalar resolves to under YAML 1.2's core schema.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value<'a> {
    Null,
    Bool(bool),
    /// An integer; `None` when it does not fit an i64.
    Int(Option<i64>),
    Float,
    Str(&'a str),
}

impl Node {
    pub fn value(&self) -> Option<Value<'_>> {
        let Kind::Scalar { text, plain } = &self.kind else { return None };
        Some(if *plain { resolve(text) } else { Value::Str(text) })
    }

    /// What the node is, for "expected X, found Y" messages (values elided).
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Seq(_) => "a list".to_owned(),
            Kind::Map(_) => "a mapping".to_owned(),
            Kind::Scalar { text, .. } => match self.value() {
                Some(Value::Null) => "nothing (null)".to_owned(),
                Some(Value::Bool(_)) => format!("boolean {text}"),
                Some(Value::Int(_)) => format!("integer {}", elide(text)),
                Some(Value::Float) => format!("number {}", elide(text)),
                _ => format!("string {:?}", elide(text)),
            },
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct ParseError {
    pub pos: Pos,
    pub reason: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}:{}: {}", self.pos.line, self.pos.column, self.reason)
    }
}

/// Values echoed in messages are cut to this many characters.
pub const SHOWN_CHARS: usize = 40;

/// `text` as shown in a message: at most [`SHOWN_CHARS`] characters, then "…".
pub fn elide(text: &str) -> String {
    match text.char_indices().nth(SHOWN_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

fn pos(mark: &saphyr_parser::Marker) -> Pos {
    Pos { line: mark.line(), column: mark.col() + 1 }
}

fn scan_error(e: &ScanError) -> ParseError {
    // The scanner has its own, higher nesting limit for flow collections (`[[[[`).
    if e.info().contains("recursion limit") {
        return ParseError {
            pos: pos(e.marker()),
            reason: format!("nested deeper than {MAX_DEPTH} levels"),
        };
    }
    let mut reason = format!("invalid YAML: {}", e.info());
    // The most likely alias is an unquoted `*` meant as "any".
    if reason.contains("alias") || reason.contains("anchor") {
        reason += " (write \"*\" quoted)";
    }
    ParseError { pos: pos(e.marker()), reason }
}

/// A collection being read: its position and what it has so far.
enum Open {
    Seq(Pos, Vec<Node>),
    /// With the key read last, waiting for its value.
    Map(Pos, Vec<(Node, Node)>, Option<Node>),
}

/// Refuses a `%YAML` directive of a version other than 1.2, which the parser would read as
/// 1.2 without a word (it does not pass the directive on): a 1.1 file meant other values
/// by the same text. Directives come before the document, among comments and blank lines.
fn version_is_1_2(src: &str) -> Result<(), ParseError> {
    for (i, line) in src.strip_prefix('\u{feff}').unwrap_or(src).lines().enumerate() {
        let line = line.trim_end();
        if let Some(rest) = line.strip_prefix("%YAML")
            && rest.starts_with([' ', '\t'])
        {
            let version = rest.split_whitespace().next().unwrap_or_default();
            if version != "1.2" {
                return Err(ParseError {
                    pos: Pos { line: i + 1, column: 1 },
                    reason: format!(
                        "YAML {} is not read here: xdpgate reads YAML 1.2 (where 0100 is 100 \
                         and yes is text); remove the directive or write %YAML 1.2",
                        elide(version)
                    ),
                });
            }
        } else if !(line.is_empty() || line.trim_start().starts_with('#') || line.starts_with('%'))
        {
            break;
        }
    }
    Ok(())
}

/// Parses one YAML document. `Ok(None)`: the source holds no document at all.
pub fn parse(src: &str) -> Result<Option<Node>, ParseError> {
    if src.len() > MAX_FILE_BYTES {
        return Err(ParseError {
            pos: Pos::default(),
            reason: format!(
                "the file is {} bytes; at most {MAX_FILE_BYTES} are accepted",
                src.len()
            ),
        });
    }
    version_is_1_2(src)?;
    let mut stack: Vec<Open> = Vec::new();
    let mut root: Option<Node> = None;
    let mut documents = 0;
    for event in Parser::new_from_str(src) {
        let (event, span) = event.map_err(|e| scan_error(&e))?;
        let at = pos(&span.start);
        let node = match event {
            Event::DocumentStart(_) => {
                documents += 1;
                if documents > 1 {
                    return Err(ParseError {
                        pos: at,
                        reason: "a policy file holds one YAML document; found a second".into(),
                    });
                }
                continue;
            }
            Event::Alias(_) => {
                return Err(ParseError {
                    pos: at,
                    reason: "aliases are not supported (write \"*\" quoted for any)".into(),
                });
            }
            Event::Scalar(_, _, anchor, _)
            | Event::SequenceStart(anchor, _)
            | Event::MappingStart(anchor, _)
                if anchor != 0 =>
            {
                return Err(ParseError {
                    pos: at,
                    reason: "anchors are not supported (write \"*\" quoted for any)".into(),
                });
            }
            Event::Scalar(_, _, _, Some(ref tag))
            | Event::SequenceStart(_, Some(ref tag))
            | Event::MappingStart(_, Some(ref tag))
                if !tag.is_yaml_core_schema() =>
            {
                // Read as if untagged, it would mean what its application gives it elsewhere.
                return Err(ParseError {
                    pos: at,
                    reason: format!("tag {} is not supported", elide(&tag.to_string())),
                });
            }
            Event::Scalar(text, style, _, tag) => {
                // An explicit tag (`!!str 80`) makes the text a string, whatever it looks like.
                let plain = style == ScalarStyle::Plain && tag.is_none();
                Node { pos: at, kind: Kind::Scalar { text: text.into_owned(), plain } }
            }
            Event::SequenceStart(..) | Event::MappingStart(..) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(ParseError {
                        pos: at,
                        reason: format!("nested deeper than {MAX_DEPTH} levels"),
                    });
                }
                stack.push(match event {
                    Event::SequenceStart(..) => Open::Seq(at, Vec::new()),
                    _ => Open::Map(at, Vec::new(), None),
                });
                continue;
            }
            Event::SequenceEnd | Event::MappingEnd => match stack.pop() {
                Some(Open::Seq(pos, items)) => Node { pos, kind: Kind::Seq(items) },
                Some(Open::Map(pos, entries, _)) => Node { pos, kind: Kind::Map(entries) },
                None => continue,
            },
            _ => continue,
        };
        match stack.last_mut() {
            Some(Open::Seq(_, items)) => items.push(node),
            Some(Open::Map(_, entries, key)) => match key.take() {
                Some(k) => entries.push((k, node)),
                None => *key = Some(node),
            },
            None => root = Some(node),
        }
    }
    Ok(root)
}

/// YAML 1.2 core schema resolution of a plain scalar.
fn resolve(text: &str) -> Value<'_> {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" | "-.inf" | "-.Inf" | "-.INF"
        | ".nan" | ".NaN" | ".NAN" => return Value::Float,
        _ => {}
    }
    // Most scalars are names and addresses: settle them without scanning (a value may be
    // megabytes long, and is looked at more than once).
    if !matches!(text.as_bytes()[0], b'0'..=b'9' | b'+' | b'-' | b'.') {
        return Value::Str(text);
    }
    let (negative, digits) = match text.as_bytes()[0] {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let radix = |prefix: &str, radix: u32| {
        let body = text.strip_prefix(prefix)?;
        (!body.is_empty() && body.chars().all(|c| c.is_digit(radix)))
            .then(|| Value::Int(i64::from_str_radix(body, radix).ok()))
    };
    if let Some(v) = radix("0x", 16).or_else(|| radix("0o", 8)) {
        return v;
    }
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        let n = digits.parse::<i64>().ok().map(|n| if negative { -n } else { n });
        return Value::Int(n);
    }
    if is_float(digits) { Value::Float } else { Value::Str(text) }
}

/// `[0-9]*(\.[0-9]*)?([eE][-+]?[0-9]+)?` with at least one digit before the exponent.
fn is_float(s: &str) -> bool {
    let (mantissa, exponent) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = digits(int) && digits(frac) && !(int.is_empty() && frac.is_empty());
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && digits(e)
    });
    mantissa_ok && exponent_ok && (mantissa.contains('.') || exponent.is_some())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn resolves_core_schema_scalars() {
        assert_eq!(resolve("80"), Value::Int(Some(80)));
        assert_eq!(resolve("-3"), Value::Int(Some(-3)));
        assert_eq!(resolve("0x50"), Value::Int(Some(80)));
        assert_eq!(resolve("99999999999999999999"), Value::Int(None));
        assert_eq!(resolve("1.5"), Value::Float);
        assert_eq!(resolve("1e3"), Value::Float);
        assert_eq!(resolve("~"), Value::Null);
        assert_eq!(resolve("true"), Value::Bool(true));
        for s in ["198.51.100.1", "80-90", "2001:db8::1", "1.2.3", "e5", ".", "-", "0x"] {
            assert_eq!(resolve(s), Value::Str(s), "{s}");
        }
    }

    /// Anchors are refused as aliases are (before: an anchor without an alias loaded, though
    /// the README says both are refused), and tags other than the core schema's (before:
    /// `!custom tcp` read as `tcp`). `!!str` still makes a string. Seen failing.
    #[test]
    fn anchors_and_other_tags_are_refused() {
        for (src, at, says) in [
            ("a: &x [1]\n", Pos { line: 1, column: 4 }, "anchors are not supported"),
            ("a:\n  b: &y c\n", Pos { line: 2, column: 6 }, "anchors are not supported"),
            ("a: !custom tcp\n", Pos { line: 1, column: 4 }, "tag !custom is not supported"),
            ("a: !x {b: 1}\n", Pos { line: 1, column: 4 }, "tag !x is not supported"),
        ] {
            let e = parse(src).expect_err(src);
            assert_eq!((e.pos, e.reason.contains(says)), (at, true), "{src}: {}", e.reason);
        }
        let root = parse("a: !!str 80\n").unwrap().unwrap();
        let Kind::Map(entries) = &root.kind else { panic!() };
        assert_eq!(entries[0].1.value(), Some(Value::Str("80")));
    }

    #[test]
    fn positions_are_one_based() {
        let root = parse("a:\n  - x\n  - 'y'\n").unwrap().unwrap();
        let Kind::Map(entries) = &root.kind else { panic!() };
        assert_eq!(entries[0].0.pos, Pos { line: 1, column: 1 });
        let Kind::Seq(items) = &entries[0].1.kind else { panic!() };
        assert_eq!(items[1].pos, Pos { line: 3, column: 5 });
        assert_eq!(items[1].value(), Some(Value::Str("y")));
    }

    #[test]
    fn deep_nesting_is_rejected_fast() {
        for src in ["[".repeat(100_000), "- ".repeat(100_000) + "x", "{a: ".repeat(100_000)] {
            let started = Instant::now();
            let e = parse(&src).unwrap_err();
            assert!(started.elapsed() < Duration::from_millis(500), "{:?}", started.elapsed());
            assert_eq!(e.reason, "nested deeper than 64 levels", "{}", &src[..10]);
            assert_eq!(e.pos.line, 1);
        }
        let ok = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        assert!(parse(&ok).is_ok());
    }

    /// The reader knows YAML 1.2 only; a file that declares another version meant other
    /// values by the same text (1.1: `0100` is 64, `yes` true), so it is refused rather
    /// than read otherwise (seen failing: `%YAML 1.1` read `0100` as 100).
    #[test]
    fn versions_other_than_1_2_are_refused() {
        for version in ["1.1", "9.9"] {
            let e = parse(&format!("# ports\n%YAML {version}\n---\np: 0100\n")).unwrap_err();
            assert_eq!(e.pos, Pos { line: 2, column: 1 });
            assert_eq!(
                e.reason,
                format!(
                    "YAML {version} is not read here: xdpgate reads YAML 1.2 (where 0100 is 100 \
                     and yes is text); remove the directive or write %YAML 1.2"
                )
            );
        }
        assert!(parse("%YAML 1.2\n---\np: 0100\n").is_ok());
        // After a byte-order mark or an indented comment too (seen failing: read as 1.2).
        for src in ["\u{feff}%YAML 1.1\n---\np: 1\n", "  # c\n%YAML 1.1\n---\np: 1\n"] {
            assert!(parse(src).unwrap_err().reason.starts_with("YAML 1.1 is not read"), "{src:?}");
        }
        // Another directive is the parser's to judge.
        assert!(!parse("%YAMLX 1.2\n---\np: 1\n").is_err_and(|e| e.reason.contains("YAML X")));
        // Text that only looks like one, in the document, is the document's.
        assert!(parse("a: |\n  %YAML 1.1\n").is_ok());
    }

    #[test]
    fn one_document_no_aliases() {
        assert!(parse("a: 1\n---\nb: 2\n").unwrap_err().reason.contains("second"));
        // The anchor is refused first, where it is.
        let e = parse("a: &x 1\nb: *x\n").unwrap_err();
        assert_eq!((e.pos, e.reason.contains("anchors")), (Pos { line: 1, column: 4 }, true));
        assert_eq!(parse("").unwrap().map(|n| n.pos), None);
    }

    #[test]
    fn refuses_files_over_the_size_limit() {
        let e = parse(&" ".repeat(MAX_FILE_BYTES + 1)).unwrap_err();
        assert_eq!(
            e.reason,
            format!(
                "the file is {} bytes; at most {MAX_FILE_BYTES} are accepted",
                MAX_FILE_BYTES + 1
            )
        );
    }

    #[test]
    fn elides_long_text() {
        assert_eq!(elide("short"), "short");
        let long = "é".repeat(10_000);
        assert_eq!(elide(&long), format!("{}…", "é".repeat(40)));
    }
}
