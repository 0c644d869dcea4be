//! Operator views: every view command (`status`, `stats`, `flows`, `lb`, `nat`, `rules`,
//! `verify-flow`) prints through [`print`], as a table for people or as JSON (`--json`,
//! `-o json`) for programs. The data comes from the dataplane crate's reports (and
//! `crate::status`, `crate::bgp::report`); these modules only present it.

pub mod bgp;
pub mod connectivity;
pub mod flows;
pub mod lb;
pub mod nat;
pub mod nexthop;
pub mod rules;
pub mod stats;
pub mod status;
pub mod topology;

use std::io::Write as _;

use anyhow::{Context, Result};
use comfy_table::{Cell, CellAlignment, ColumnConstraint, ContentArrangement, Table, presets};

/// How a view is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns and short summaries, for people.
    Table,
    /// The whole report as pretty-printed JSON, for programs.
    Json,
}

/// The output options every view command takes: `--json`, or `-o table|json`.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct OutputArgs {
    /// Print JSON instead of a table (same as `-o json`).
    #[arg(long)]
    json: bool,
    /// Output format.
    #[arg(short, long, value_enum, conflicts_with = "json")]
    output: Option<Format>,
}

impl OutputArgs {
    pub fn format(&self) -> Format {
        if self.json { Format::Json } else { self.output.unwrap_or(Format::Table) }
    }
}

/// A report that can be shown either way.
pub trait View {
    /// What `--json` prints.
    fn json(&self) -> Result<serde_json::Value>;
    /// What a terminal gets: tables and summary lines, each line ending in a newline.
    fn text(&self) -> String;
}

/// The one place view commands print.
pub fn print<V: View + ?Sized>(view: &V, format: Format) -> Result<()> {
    let out = match format {
        Format::Table => view.text(),
        Format::Json => {
            let mut s = serde_json::to_string_pretty(&view.json()?).context("encoding JSON")?;
            s.push('\n');
            s
        }
    };
    // A closed pipe ends the process quietly (SIGPIPE is at its default in main).
    std::io::stdout().lock().write_all(out.as_bytes()).context("writing to stdout")
}

/// `serde_json::to_value` with the error said in words.
pub fn to_json(v: &impl serde::Serialize) -> Result<serde_json::Value> {
    serde_json::to_value(v).context("encoding JSON")
}

/// Moves an object's flat `packets` and `bytes` into `"traffic": {"packets": .., "bytes": ..}`,
/// the shape every counter has in JSON.
pub fn group_traffic(v: &mut serde_json::Value) {
    let Some(object) = v.as_object_mut() else { return };
    if let (Some(packets), Some(bytes)) = (object.remove("packets"), object.remove("bytes")) {
        object.insert("traffic".into(), serde_json::json!({"packets": packets, "bytes": bytes}));
    }
}

/// Bytes for people in tables: `512 B`, `1.2 KiB`, `3.4 MiB` (binary units, one decimal);
/// JSON keeps the exact count.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    // Rounded to one decimal: 1023.96 KiB shows as 1.0 MiB, not 1024.0 KiB.
    while v >= 1023.95 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// Columns a table is fitted to when asked ([`Grid::fit`]): an 100-column terminal.
pub const WIDTH: u16 = 100;

/// A borderless table like `ip` or `kubectl` print: a header line, columns two spaces
/// apart, no trailing blanks; numeric columns aligned right.
pub struct Grid {
    table: Table,
    right: Vec<usize>,
    /// With [`Grid::fit`]: the columns that may wrap (the others keep their width).
    wrap: Option<Vec<usize>>,
}

impl Grid {
    pub fn new(header: &[&str]) -> Self {
        let mut table = Table::new();
        table.load_style(presets::NOTHING);
        table.set_header(header.iter().map(|h| Cell::new(*h)));
        Self { table, right: Vec::new(), wrap: None }
    }

    /// Wraps the cells of the `wrap` columns (at spaces where it can) so that lines fit
    /// [`WIDTH`] columns; the other columns are never wrapped.
    pub fn fit(mut self, wrap: &[usize]) -> Self {
        self.table.set_content_arrangement(ContentArrangement::Dynamic);
        self.table.set_width(WIDTH);
        self.wrap = Some(wrap.to_vec());
        self
    }

    /// Aligns these columns (by index) to the right.
    pub fn right(mut self, columns: &[usize]) -> Self {
        self.right.extend_from_slice(columns);
        self
    }

    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) {
        self.table.add_row(cells.into_iter().map(|c| Cell::new(c.into())));
    }

    pub fn is_empty(&self) -> bool {
        self.table.row_count() == 0
    }

    pub fn render(mut self) -> String {
        // Columns exist once rows do, so their layout is set last.
        let count = self.table.column_count();
        for (i, column) in self.table.column_iter_mut().enumerate() {
            column.set_padding((0, if i + 1 == count { 0 } else { 2 }));
            if self.right.contains(&i) {
                column.set_cell_alignment(CellAlignment::Right);
            }
            if self.wrap.as_ref().is_some_and(|w| !w.contains(&i)) {
                column.set_constraint(ColumnConstraint::ContentWidth);
            }
        }
        let mut out = self.table.trim_fmt();
        out.push('\n');
        out
    }
}

/// Text for a labelled line: `text` wrapped at spaces so that no line, with the label's
/// `indent` columns before it, passes 100 columns; the lines after the first indented to
/// line up under it. A word longer than a line stands alone.
pub fn wrap(text: &str, indent: usize) -> String {
    let room = (WIDTH as usize).saturating_sub(indent).max(20);
    let mut out = String::new();
    let mut line = 0;
    for word in text.split(' ') {
        if line > 0 && line + 1 + word.len() > room {
            out.push('\n');
            out.push_str(&" ".repeat(indent));
            line = 0;
        } else if line > 0 {
            out.push(' ');
            line += 1;
        }
        out.push_str(word);
        line += word.len();
    }
    out
}

/// `Debug` of a plain enum in lower case (`Inbound` -> `inbound`).
pub fn lower(v: impl std::fmt::Debug) -> String {
    format!("{v:?}").to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_asked_for_by_either_flag_and_not_by_both() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            output: OutputArgs,
        }
        let format = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
                .map(|c| c.output.format())
                .map_err(|e| e.kind())
        };
        assert_eq!(format(&[]), Ok(Format::Table));
        assert_eq!(format(&["--json"]), Ok(Format::Json));
        assert_eq!(format(&["-o", "json"]), Ok(Format::Json));
        assert_eq!(format(&["--output", "table"]), Ok(Format::Table));
        assert_eq!(
            format(&["--json", "-o", "table"]),
            Err(clap::error::ErrorKind::ArgumentConflict)
        );
        assert_eq!(format(&["-o", "yaml"]), Err(clap::error::ErrorKind::InvalidValue));
    }

    #[test]
    fn wrap_keeps_lines_within_100_columns_and_aligned() {
        let text = "word ".repeat(40);
        let wrapped = wrap(text.trim_end(), 15);
        let lines: Vec<&str> = wrapped.lines().collect();
        assert_eq!(lines.len(), 3, "{wrapped}");
        assert!(lines[0].len() <= 85 && lines[0].len() > 75, "{wrapped}");
        assert!(lines[1..].iter().all(|l| l.starts_with(&" ".repeat(15)) && l.len() <= 100));
        assert_eq!(wrapped.split_whitespace().count(), 40);
        assert_eq!(wrap("short", 15), "short");
    }

    #[test]
    fn bytes_for_people() {
        let cases = [
            (0, "0 B"),
            (1023, "1023 B"),
            (1024, "1.0 KiB"),
            (1229, "1.2 KiB"),
            (1_258_291, "1.2 MiB"),
            (1024 * 1024 - 1, "1.0 MiB"),
            (5 << 30, "5.0 GiB"),
            (u64::MAX, "16.0 EiB"),
        ];
        for (n, want) in cases {
            assert_eq!(bytes(n), want, "{n}");
        }
    }

    #[test]
    fn a_fitted_grid_wraps_to_the_width() {
        let mut g = Grid::new(&["NAME", "LIST"]).fit(&[1]);
        let long: Vec<String> = (0..40).map(|i| format!("192.0.2.{i}/32")).collect();
        g.row(["a".to_string(), long.join(", ")]);
        let text = g.render();
        assert!(text.lines().count() > 2, "{text}");
        for line in text.lines() {
            assert!(line.chars().count() <= WIDTH as usize, "{} columns: {line}", line.len());
        }
        for p in &long {
            assert!(text.contains(p.as_str()), "{p} missing: {text}");
        }
    }

    #[test]
    fn grid_aligns_columns_without_borders_or_trailing_blanks() {
        let mut g = Grid::new(&["NAME", "PACKETS", "NOTE"]).right(&[1]);
        g.row(["a", "5", ""]);
        g.row(["longer-name", "12345", "x"]);
        let text = g.render();
        assert_eq!(
            text,
            "NAME         PACKETS  NOTE\n\
             a                  5\n\
             longer-name    12345  x\n",
            "{text}"
        );
    }
}
