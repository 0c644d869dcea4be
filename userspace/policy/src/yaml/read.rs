//! Reads the raw document out of the positioned tree: every unknown field, wrong type,
//! duplicate key and missing field is reported, and reading goes on. A value that could not
//! be read is replaced by a placeholder and its path marked bad, so that validation does
//! not report it a second time (an unreadable name is not also "empty").

use std::collections::{HashMap, HashSet};

use super::{
    super::tree::{Kind, Node, Pos, Value, elide},
    List, PolicyError,
};

/// Where the value of each path is, and which paths could not be read.
#[derive(Debug, Default)]
pub(super) struct Index {
    positions: HashMap<String, Pos>,
    bad: HashSet<String>,
}

impl Index {
    /// The position of `path`, or of its nearest ancestor that was written.
    pub fn pos(&self, mut path: &str) -> Pos {
        loop {
            if let Some(&pos) = self.positions.get(path) {
                return pos;
            }
            if path.is_empty() {
                return Pos::default();
            }
            path = parent(path);
        }
    }

    pub fn line(&self, path: &str) -> usize {
        self.pos(path).line
    }

    /// Whether `path` or an ancestor already has an error that makes errors at `path` noise.
    pub fn is_bad(&self, mut path: &str) -> bool {
        loop {
            if self.bad.contains(path) {
                return true;
            }
            if path.is_empty() {
                return false;
            }
            path = parent(path);
        }
    }
}

/// `a.b[0]` -> `a.b` -> `a` -> ``.
fn parent(path: &str) -> &str {
    path.rfind(['.', '[']).map_or("", |i| &path[..i])
}

/// `path.key`, the key elided so that a huge key cannot make a huge message.
pub(super) fn child(path: &str, key: &str) -> String {
    let key = elide(key);
    if path.is_empty() { key } else { format!("{path}.{key}") }
}

/// Words and names longer than this (bytes) are not compared: nothing is meant by them, and
/// comparing two takes time in proportion to the product of their lengths.
const MAX_COMPARED_BYTES: usize = 200;

/// What comparing `word` with `candidate` costs, in the units of a file's budget for
/// suggestions: about the product of their lengths (the Jaro similarity's work), at least 64.
pub(super) fn comparison_cost(word: &str, candidate: &str) -> usize {
    (word.len().min(MAX_COMPARED_BYTES) + 8) * (candidate.len().min(MAX_COMPARED_BYTES) + 8)
}

/// The candidate closest to `word`, if it is close enough to be what was meant.
pub(super) fn suggest<'c>(
    word: &str,
    candidates: impl IntoIterator<Item = &'c str>,
) -> Option<&'c str> {
    if word.len() > MAX_COMPARED_BYTES {
        return None;
    }
    let word = word.to_lowercase();
    candidates
        .into_iter()
        .filter(|c| c.len() <= MAX_COMPARED_BYTES)
        .map(|c| (strsim::jaro_winkler(&word, &c.to_lowercase()), c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// A mapping's known fields, by name.
pub(super) struct Fields<'n> {
    pub path: String,
    entries: HashMap<&'n str, &'n Node>,
    /// Known fields that an unknown one was taken for: not also reported missing.
    suggested: HashSet<&'static str>,
}

pub(super) struct Reader<'f> {
    pub file: &'f str,
    pub index: Index,
    pub errors: Vec<PolicyError>,
}

impl<'f> Reader<'f> {
    pub fn new(file: &'f str) -> Self {
        Self { file, index: Index::default(), errors: Vec::new() }
    }

    pub fn error_at(&mut self, path: &str, pos: Pos, reason: impl Into<String>) {
        self.errors.push(PolicyError {
            file: self.file.to_owned(),
            line: pos.line,
            column: pos.column,
            field: path.to_owned(),
            reason: reason.into(),
        });
    }

    /// Records a type error at `path`, whose value is then a placeholder.
    fn wrong_type(&mut self, path: &str, node: &Node, expected: &str) {
        self.error_at(path, node.pos, format!("expected {expected}, found {}", node.describe()));
        self.index.bad.insert(path.to_owned());
    }

    fn record(&mut self, path: &str, node: &Node) {
        self.index.positions.entry(path.to_owned()).or_insert(node.pos);
    }

    pub fn mark_bad(&mut self, path: &str) {
        self.index.bad.insert(path.to_owned());
    }

    pub fn root(&mut self, node: &Node) {
        self.record("", node);
    }

    /// The keys and values of a mapping with any keys, each key once.
    pub fn entries<'n>(&mut self, path: &str, node: &'n Node) -> Vec<(&'n str, &'n Node)> {
        self.keyed_entries(path, node).into_iter().map(|(k, _, v)| (k, v)).collect()
    }

    /// [`Self::entries`] with the position of each key.
    fn keyed_entries<'n>(&mut self, path: &str, node: &'n Node) -> Vec<(&'n str, Pos, &'n Node)> {
        let Kind::Map(entries) = &node.kind else {
            if node.value() != Some(Value::Null) {
                self.wrong_type(path, node, "a mapping");
            }
            return Vec::new();
        };
        let mut seen: HashMap<&str, usize> = HashMap::new();
        let mut out = Vec::new();
        for (key, value) in entries {
            let Kind::Scalar { text, .. } = &key.kind else {
                let reason = format!("a key must be a name, not {}", key.describe());
                self.error_at(path, key.pos, reason);
                continue;
            };
            if let Some(line) = seen.get(text.as_str()) {
                let reason = format!("duplicate key \"{}\" (first on line {line})", elide(text));
                self.error_at(&child(path, text), key.pos, reason);
                continue;
            }
            seen.insert(text, key.pos.line);
            // A scalar is shown where it is; a list or mapping where its key is (the first
            // item of a block list is on a later line).
            let at = if matches!(value.kind, Kind::Scalar { .. }) { value } else { key };
            self.record(&child(path, text), at);
            out.push((text.as_str(), key.pos, value));
        }
        out
    }

    /// A mapping whose keys must be among `known`; `None` (after an error) if `node` is not
    /// a mapping.
    pub fn fields<'n>(
        &mut self,
        path: &str,
        node: &'n Node,
        known: &[&'static str],
    ) -> Option<Fields<'n>> {
        if !matches!(node.kind, Kind::Map(_)) {
            self.wrong_type(path, node, "a mapping");
            return None;
        }
        let mut fields =
            Fields { path: path.to_owned(), entries: HashMap::new(), suggested: HashSet::new() };
        for (key, key_pos, value) in self.keyed_entries(path, node) {
            if known.contains(&key) {
                fields.entries.insert(key, value);
                continue;
            }
            let reason = match suggest(key, known.iter().copied()) {
                Some(s) => {
                    fields.suggested.insert(s);
                    format!("unknown field \"{}\"; did you mean \"{s}\"?", elide(key))
                }
                None => {
                    format!(
                        "unknown field \"{}\"; expected one of: {}",
                        elide(key),
                        known.join(", ")
                    )
                }
            };
            self.error_at(path, key_pos, reason);
        }
        Some(fields)
    }

    /// A field's node; a null value counts as not written (an optional value a generated
    /// file writes as `null` takes its default).
    fn get<'n>(&self, f: &Fields<'n>, name: &str) -> Option<&'n Node> {
        f.entries.get(name).copied().filter(|n| n.value() != Some(Value::Null))
    }

    /// A list's node, `None` if not written. Written without a value (`~`, or its items
    /// commented out under it) is an error, never "not written": `nsgs:` or `rules:` with
    /// its items commented out would otherwise load as a policy without them, unseen.
    fn get_list<'n>(&mut self, f: &Fields<'n>, name: &str, hint: Option<&str>) -> Option<&'n Node> {
        let node = f.entries.get(name).copied()?;
        if node.value() != Some(Value::Null) {
            return Some(node);
        }
        let path = child(&f.path, name);
        if !f.suggested.contains(name) && self.index.bad.insert(path.clone()) {
            let pos = self.index.pos(&path);
            let reason = match hint {
                Some(hint) => format!("needs a value ({hint})"),
                None => "needs a value".to_owned(),
            };
            self.error_at(&path, pos, reason);
        }
        None
    }

    fn missing(&mut self, f: &Fields, name: &str) {
        let path = child(&f.path, name);
        if f.suggested.contains(name) {
            // "did you mean" already said where it is.
            self.index.bad.insert(path);
            return;
        }
        let reason = match f.entries.contains_key(name) {
            true => format!("\"{name}\" needs a value"),
            false => format!("missing field \"{name}\""),
        };
        let pos = self.index.pos(&path);
        self.error_at(&f.path, pos, reason);
        self.index.bad.insert(path);
    }

    fn text_of(&mut self, path: &str, node: &Node) -> Option<String> {
        match node.value() {
            Some(Value::Str(s)) => Some(s.to_owned()),
            _ => {
                self.wrong_type(path, node, "a string");
                None
            }
        }
    }

    fn int_of(&mut self, path: &str, node: &Node) -> Option<i64> {
        match node.value() {
            Some(Value::Int(Some(n))) => Some(n),
            Some(Value::Int(None)) => {
                self.error_at(path, node.pos, "integer too large");
                self.index.bad.insert(path.to_owned());
                None
            }
            _ => {
                self.wrong_type(path, node, "an integer");
                None
            }
        }
    }

    /// A string or an integer, as text.
    fn scalar_of(&mut self, path: &str, node: &Node) -> Option<String> {
        match (node.value(), &node.kind) {
            (Some(Value::Str(s)), _) => Some(s.to_owned()),
            (Some(Value::Int(Some(n))), _) => Some(n.to_string()),
            (Some(Value::Int(None)), Kind::Scalar { text, .. }) => Some(text.clone()),
            _ => {
                self.wrong_type(path, node, "a string or an integer");
                None
            }
        }
    }

    pub fn string(&mut self, f: &Fields, name: &str) -> String {
        self.opt_string(f, name).unwrap_or_else(|| {
            if !self.index.bad.contains(&child(&f.path, name)) {
                self.missing(f, name);
            }
            String::new()
        })
    }

    pub fn opt_string(&mut self, f: &Fields, name: &str) -> Option<String> {
        let node = self.get(f, name)?;
        self.text_of(&child(&f.path, name), node)
    }

    pub fn int(&mut self, f: &Fields, name: &str) -> i64 {
        self.opt_int(f, name).unwrap_or_else(|| {
            if !self.index.bad.contains(&child(&f.path, name)) {
                self.missing(f, name);
            }
            0
        })
    }

    pub fn opt_int(&mut self, f: &Fields, name: &str) -> Option<i64> {
        let node = self.get(f, name)?;
        self.int_of(&child(&f.path, name), node)
    }

    pub fn opt_scalar(&mut self, f: &Fields, name: &str) -> Option<String> {
        let node = self.get(f, name)?;
        self.scalar_of(&child(&f.path, name), node)
    }

    pub fn opt_bool(&mut self, f: &Fields, name: &str) -> Option<bool> {
        let node = self.get(f, name)?;
        match node.value() {
            Some(Value::Bool(b)) => Some(b),
            _ => {
                self.wrong_type(&child(&f.path, name), node, "true or false");
                None
            }
        }
    }

    /// A required list: an error if not written.
    pub fn required_list(&mut self, f: &Fields, name: &str) -> List {
        let node = self.get(f, name);
        node.map(|node| self.list_of(&child(&f.path, name), node)).unwrap_or_else(|| {
            if !self.index.bad.contains(&child(&f.path, name)) {
                self.missing(f, name);
            }
            List::default()
        })
    }

    /// A list of ports: left out, any port. Written without a value (`~`, or a list
    /// commented out) is an error, not "any": it would open every port of the rule.
    pub fn ports(&mut self, f: &Fields, name: &str) -> List {
        let hint = "leave the field out, or write \"*\", for any port";
        self.written_list(f, name, Some(hint)).unwrap_or_else(List::any)
    }

    /// A list of strings and integers, also written as one of them; `None` if not written.
    /// Written without a value is an error: a list commented out under its key would
    /// otherwise narrow (an NSG's `hosts`) or widen what the policy says, unseen.
    pub fn list(&mut self, f: &Fields, name: &str) -> Option<List> {
        self.written_list(f, name, None)
    }

    fn written_list(&mut self, f: &Fields, name: &str, hint: Option<&str>) -> Option<List> {
        let node = self.get_list(f, name, hint)?;
        Some(self.list_of(&child(&f.path, name), node))
    }

    pub fn list_of(&mut self, path: &str, node: &Node) -> List {
        match &node.kind {
            Kind::Seq(items) => {
                let items = (items.iter().enumerate())
                    .map(|(i, item)| {
                        let item_path = format!("{path}[{i}]");
                        self.record(&item_path, item);
                        self.scalar_of(&item_path, item).unwrap_or_default()
                    })
                    .collect();
                List { items, is_seq: true }
            }
            _ => match self.scalar_of(path, node) {
                Some(item) => List { items: vec![item], is_seq: false },
                None => List::default(),
            },
        }
    }

    /// A list of items read by `read` (each with its path); empty if not written (written
    /// without a value is an error).
    pub fn seq<T>(
        &mut self,
        f: &Fields,
        name: &str,
        mut read: impl FnMut(&mut Self, &str, &Node) -> T,
    ) -> Vec<T> {
        let Some(node) = self.get_list(f, name, None) else { return Vec::new() };
        let path = child(&f.path, name);
        let Kind::Seq(items) = &node.kind else {
            self.wrong_type(&path, node, "a list");
            return Vec::new();
        };
        (items.iter().enumerate())
            .map(|(i, item)| {
                let item_path = format!("{path}[{i}]");
                self.record(&item_path, item);
                read(self, &item_path, item)
            })
            .collect()
    }

    /// The node of a field, for fields with a shape of their own.
    pub fn node<'n>(&self, f: &Fields<'n>, name: &str) -> Option<&'n Node> {
        self.get(f, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names() {
        let fields = ["priority", "protocol", "source_ports", "destination"];
        assert_eq!(suggest("prority", fields), Some("priority"));
        assert_eq!(suggest("sourceports", fields), Some("source_ports"));
        assert_eq!(suggest("colour", fields), None);
        assert_eq!(suggest("internet", ["Internet", "VirtualNetwork"]), Some("Internet"));
    }
}
