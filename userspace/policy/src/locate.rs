//! Maps a YAML path such as `nsgs[0].rules[2].priority` to its line in the source text.
//!
//! serde_yaml does not expose spans of deserialized values, so validation errors find their
//! line by scanning the text: block-style YAML is tracked by indentation, `key:` lines and
//! `- ` sequence items. Flow collections (`[a, b]`) are not looked into, so an element of
//! one is reported at the line of its key.

use std::collections::HashMap;

/// The 1-based line of every mapping key and block sequence item of a document, by path.
#[derive(Debug, Default)]
pub struct LineIndex {
    lines: HashMap<String, usize>,
}

impl LineIndex {
    pub fn new(src: &str) -> Self {
        Scanner::default().scan(src)
    }

    /// The line of `path`, or of its nearest ancestor present in the source; 0 if none is.
    pub fn line(&self, path: &str) -> usize {
        let mut path = path;
        loop {
            if let Some(&line) = self.lines.get(path) {
                return line;
            }
            if path.is_empty() {
                return 0;
            }
            path = parent(path);
        }
    }
}

/// The line of `path` in `src` (see [`LineIndex::line`]).
pub fn line_of(src: &str, path: &str) -> usize {
    LineIndex::new(src).line(path)
}

/// `a.b[0]` -> `a.b` -> `a` -> ``.
fn parent(path: &str) -> &str {
    path.rfind(['.', '[']).map_or("", |i| &path[..i])
}

/// An open node: a mapping key or a sequence item, and the column it starts at.
struct Frame {
    indent: usize,
    path: String,
    is_item: bool,
    /// Sequence items seen so far under this node, for the next item's index.
    items: usize,
}

struct Scanner {
    /// Open nodes, outermost first; the root (empty path) is never popped.
    stack: Vec<Frame>,
    lines: HashMap<String, usize>,
    /// Inside a block scalar (`|` or `>`) owned by a node at this column.
    block_scalar: Option<usize>,
    /// Unclosed brackets of a flow collection spanning several lines.
    flow_depth: i32,
}

impl Default for Scanner {
    fn default() -> Self {
        let root = Frame { indent: 0, path: String::new(), is_item: false, items: 0 };
        Self { stack: vec![root], lines: HashMap::new(), block_scalar: None, flow_depth: 0 }
    }
}

impl Scanner {
    fn scan(mut self, src: &str) -> LineIndex {
        for (n, raw) in src.lines().enumerate() {
            let content = raw.trim_start_matches(' ');
            let indent = raw.len() - content.len();
            if let Some(owner) = self.block_scalar {
                if content.trim().is_empty() || indent > owner {
                    continue;
                }
                self.block_scalar = None;
            }
            let text = strip_comment(content).trim_end();
            if self.flow_depth > 0 {
                self.flow_depth += bracket_balance(text);
                continue;
            }
            if is_structural_noise(text) {
                continue;
            }
            self.node(indent, text, n + 1);
        }
        LineIndex { lines: self.lines }
    }

    /// One line: any number of `- ` item markers, then maybe `key:`, then maybe a value.
    fn node(&mut self, mut col: usize, mut text: &str, line: usize) {
        let mut owner = col;
        while let Some(rest) = item_content(text) {
            self.item(col, line);
            owner = col;
            let rest_trimmed = rest.trim_start_matches(' ');
            col += text.len() - rest_trimmed.len();
            text = rest_trimmed;
        }
        let value = match split_key(text) {
            Some((key, value)) => {
                self.key(col, key, line);
                owner = col;
                value
            }
            None => text,
        };
        self.value(owner, value.trim());
    }

    fn item(&mut self, col: usize, line: usize) {
        // Siblings and anything deeper end here; a key at the same column owns the sequence
        // (`key:` followed by `- x` at the same indentation is valid YAML).
        self.pop_while(|f| f.indent > col || (f.indent == col && f.is_item));
        let parent = self.stack.last_mut().expect("root frame");
        let path = format!("{}[{}]", parent.path, parent.items);
        parent.items += 1;
        self.push(col, path, true, line);
    }

    fn key(&mut self, col: usize, key: &str, line: usize) {
        self.pop_while(|f| f.indent >= col);
        let parent = &self.stack.last().expect("root frame").path;
        let path = if parent.is_empty() { key.to_owned() } else { format!("{parent}.{key}") };
        self.push(col, path, false, line);
    }

    /// Notes values whose content continues on the following lines.
    fn value(&mut self, owner: usize, value: &str) {
        if value.starts_with(['|', '>']) {
            self.block_scalar = Some(owner);
        } else if value.starts_with(['[', '{']) {
            self.flow_depth = bracket_balance(value).max(0);
        }
    }

    fn push(&mut self, indent: usize, path: String, is_item: bool, line: usize) {
        // The first occurrence wins; duplicate keys are serde's to report.
        self.lines.entry(path.clone()).or_insert(line);
        self.stack.push(Frame { indent, path, is_item, items: 0 });
    }

    fn pop_while(&mut self, pred: impl Fn(&Frame) -> bool) {
        while self.stack.len() > 1 && pred(self.stack.last().expect("root frame")) {
            self.stack.pop();
        }
    }
}

/// Blank lines, document markers and directives.
fn is_structural_noise(text: &str) -> bool {
    text.is_empty() || text.starts_with("---") || text == "..." || text.starts_with('%')
}

/// The rest of a `- ` sequence item line, or `None` if `text` is not one.
fn item_content(text: &str) -> Option<&str> {
    match text.strip_prefix('-')? {
        "" => Some(""),
        rest if rest.starts_with(' ') => Some(rest),
        _ => None,
    }
}

/// Splits `key: value` (also `key:` and quoted keys) into the unquoted key and the value.
fn split_key(text: &str) -> Option<(&str, &str)> {
    if let Some(quote) = text.chars().next().filter(|c| matches!(c, '"' | '\'')) {
        let end = text[1..].find(quote)? + 1;
        let rest = text[end + 1..].trim_start().strip_prefix(':')?;
        return (rest.is_empty() || rest.starts_with(' ')).then(|| (&text[1..end], rest));
    }
    if text.starts_with(['[', '{', '&', '*', '!', '|', '>']) {
        return None;
    }
    let colon = text.match_indices(':').map(|(i, _)| i).find(|&i| {
        let after = &text[i + 1..];
        after.is_empty() || after.starts_with(' ')
    })?;
    Some((text[..colon].trim_end(), &text[colon + 1..]))
}

/// Yields each character of `text` with whether it sits inside a quoted scalar. A quote only
/// opens a scalar at its start, so apostrophes inside plain words are ordinary characters.
fn unquoted_chars(text: &str) -> impl Iterator<Item = (usize, char, bool)> + '_ {
    let mut quote: Option<char> = None;
    let mut prev = ' ';
    text.char_indices().map(move |(i, c)| {
        let quoted = match quote {
            Some(q) => {
                if c == q {
                    quote = None;
                }
                true
            }
            None if matches!(c, '"' | '\'') && matches!(prev, ' ' | '[' | '{' | ',' | ':') => {
                quote = Some(c);
                true
            }
            None => false,
        };
        prev = c;
        (i, c, quoted)
    })
}

/// `text` without a trailing `# comment`.
fn strip_comment(text: &str) -> &str {
    let mut prev = ' ';
    for (i, c, quoted) in unquoted_chars(text) {
        if c == '#' && !quoted && prev.is_whitespace() {
            return &text[..i];
        }
        prev = c;
    }
    text
}

/// Opening minus closing flow brackets outside quoted scalars.
fn bracket_balance(text: &str) -> i32 {
    unquoted_chars(text)
        .filter(|&(_, _, quoted)| !quoted)
        .map(|(_, c, _)| match c {
            '[' | '{' => 1,
            ']' | '}' => -1,
            _ => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
# leading comment
virtual_network:
  address_space: [198.51.100.0/24, 2001:db8:1::/64]   # flow list
  peered:
    - 192.0.2.128/25
\"quoted key\": 1
nsgs:
- name: web-nsg          # a '#' comment: with a colon
  description: |
    free text: not a key
    - not an item
  subnets:
  - 198.51.100.0/25
  rules:
    - name: allow-http
      priority: 100
      destination_ports: [80,
                          443]
      source: 'a # b'
    -
      name: second
      priority: 200
  hosts: [198.51.100.10]
- name: db-nsg
  rules:
  - - nested
    - items
settings:
  tcp_idle_timeout: 240
";

    #[test]
    fn finds_keys_and_items() {
        let index = LineIndex::new(DOC);
        for (path, line) in [
            ("virtual_network", 2),
            ("virtual_network.address_space", 3),
            ("virtual_network.peered", 4),
            ("virtual_network.peered[0]", 5),
            ("quoted key", 6),
            ("nsgs", 7),
            ("nsgs[0]", 8),
            ("nsgs[0].name", 8),
            ("nsgs[0].description", 9),
            ("nsgs[0].subnets", 12),
            ("nsgs[0].subnets[0]", 13),
            ("nsgs[0].rules", 14),
            ("nsgs[0].rules[0]", 15),
            ("nsgs[0].rules[0].name", 15),
            ("nsgs[0].rules[0].priority", 16),
            ("nsgs[0].rules[0].destination_ports", 17),
            ("nsgs[0].rules[0].source", 19),
            ("nsgs[0].rules[1]", 20),
            ("nsgs[0].rules[1].name", 21),
            ("nsgs[0].rules[1].priority", 22),
            ("nsgs[0].hosts", 23),
            ("nsgs[1]", 24),
            ("nsgs[1].name", 24),
            ("nsgs[1].rules[0]", 26),
            ("nsgs[1].rules[0][0]", 26),
            ("nsgs[1].rules[0][1]", 27),
            ("settings.tcp_idle_timeout", 29),
        ] {
            assert_eq!(index.line(path), line, "{path}");
        }
    }

    #[test]
    fn ignores_block_scalar_content() {
        let index = LineIndex::new(DOC);
        assert_eq!(index.line("nsgs[0].free text"), 8);
        assert_eq!(index.line("nsgs[0].description[0]"), 9);
    }

    #[test]
    fn falls_back_to_nearest_ancestor() {
        // Elements of flow lists are not indexed: their key's line stands in.
        assert_eq!(line_of(DOC, "virtual_network.address_space[1]"), 3);
        assert_eq!(line_of(DOC, "nsgs[0].rules[0].destination_ports[1]"), 17);
        assert_eq!(line_of(DOC, "nsgs[0].rules[1].direction"), 20);
        assert_eq!(line_of(DOC, "nsgs[5].rules[0]"), 7);
        assert_eq!(line_of(DOC, "missing.path"), 0);
        assert_eq!(line_of(DOC, ""), 0);
    }

    #[test]
    fn splits_keys() {
        assert_eq!(split_key("a: b"), Some(("a", " b")));
        assert_eq!(split_key("a:"), Some(("a", "")));
        assert_eq!(split_key("'a b': c"), Some(("a b", " c")));
        assert_eq!(split_key("2001:db8::1"), None);
        assert_eq!(split_key("[a: b]"), None);
        assert_eq!(strip_comment("a: 'x # y' # z"), "a: 'x # y' ");
        assert_eq!(strip_comment("it's # z"), "it's ");
        assert_eq!(bracket_balance("[a, '[', {b: c}"), 1);
    }
}
