//! Pick-a-Pic v2 parquet shards through parquet's row API, one row group and a few rows at a
//! time. Only the six columns a pair needs are decoded (`caption`, `has_label`, `label_0`,
//! `label_1`, `jpg_0`, `jpg_1`); the rule order is Pick-a-Pic's: `has_label` false -> no label,
//! 0.5 / 0.5 -> tie, (1, 0) -> image 0 wins, (0, 1) -> image 1 wins, anything else -> bad label.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parquet::basic::Compression;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::reader::{ReaderIter, TreeBuilder};
use parquet::record::{Field, Row};
use parquet::schema::types::{SchemaDescriptor, Type};

use super::{file_name, Cursor, ImageSource, PreferencePair, Record, Verdict};
use crate::error::{Error, Result};

/// The columns read; `has_label` may be absent (then every row counts as labeled).
const REQUIRED: [&str; 5] = ["caption", "label_0", "label_1", "jpg_0", "jpg_1"];
const HAS_LABEL: &str = "has_label";

/// Rows per column batch: up to this many encoded images per image column stay in memory
/// (Pick-a-Pic's are a few hundred KB each), instead of parquet's default 1024.
const BATCH_ROWS: usize = 16;

fn file_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::File { path: path.to_path_buf(), msg: msg.into() }
}

/// Opens a shard's footer (metadata only).
fn open_footer(path: &Path) -> Result<SerializedFileReader<File>> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    SerializedFileReader::new(f).map_err(|e| file_err(path, format!("not a readable parquet file: {e}")))
}

/// Rows of each shard, from the footers.
pub fn shard_rows(shards: &[PathBuf]) -> Result<Vec<u64>> {
    shards.iter().map(|p| Ok(open_footer(p)?.metadata().file_metadata().num_rows().max(0) as u64)).collect()
}

struct OpenShard {
    file: SerializedFileReader<File>,
    /// The projection: the columns read, in file order.
    descr: Arc<SchemaDescriptor>,
    /// The next row group to open.
    group: usize,
    rows: Option<ReaderIter>,
}

/// Reads the records of `shards` in order; see [`super::PairStream`].
pub struct PickapicReader {
    shards: Vec<PathBuf>,
    /// The global index of each shard's first row.
    offsets: Vec<u64>,
    rows_per_shard: Vec<u64>,
    shard: usize,
    /// The next row of `shard`.
    row: u64,
    open: Option<OpenShard>,
}

impl PickapicReader {
    /// Reads every footer (row counts, for global indices), then starts at row `row` of shard
    /// `shard`.
    pub fn open(shards: &[PathBuf], shard: usize, row: u64) -> Result<PickapicReader> {
        let rows_per_shard = shard_rows(shards)?;
        let mut offsets = Vec::with_capacity(shards.len());
        let mut total = 0u64;
        for n in &rows_per_shard {
            offsets.push(total);
            total += n;
        }
        if let Some(&n) = rows_per_shard.get(shard) {
            if row > n {
                return Err(Error::Invalid(format!(
                    "data cursor: row {row} of {} but that shard has {n} rows",
                    shards[shard].display()
                )));
            }
        }
        Ok(PickapicReader { shards: shards.to_vec(), offsets, rows_per_shard, shard, row, open: None })
    }

    pub fn cursor(&self) -> Cursor {
        let file = self.shards.get(self.shard).map(|p| file_name(p)).unwrap_or_default();
        Cursor::Parquet { shard: self.shard, file, row: self.row }
    }

    /// Rows of each shard (from the footers).
    pub fn rows_per_shard(&self) -> &[u64] {
        &self.rows_per_shard
    }

    pub fn next_record(&mut self) -> Option<Result<Record>> {
        loop {
            let path = self.shards.get(self.shard)?.clone();
            if self.open.is_none() {
                match open_shard(&path, self.row) {
                    Ok(o) => self.open = Some(o),
                    Err(e) => return Some(Err(e)),
                }
            }
            let open = self.open.as_mut()?;
            match next_row(&path, open) {
                Some(Ok(row)) => {
                    let cursor = self.cursor();
                    let index = self.offsets[self.shard] + self.row;
                    self.row += 1;
                    return Some(record(&path, row, index, cursor));
                }
                Some(Err(e)) => return Some(Err(e)),
                None => {
                    self.shard += 1;
                    self.row = 0;
                    self.open = None;
                }
            }
        }
    }
}

/// The next row of an open shard, opening row groups as needed.
fn next_row(path: &Path, o: &mut OpenShard) -> Option<Result<Row>> {
    loop {
        if let Some(rows) = &mut o.rows {
            match rows.next() {
                Some(Ok(r)) => return Some(Ok(r)),
                Some(Err(e)) => {
                    return Some(Err(file_err(path, format!("row group {}: {e}", o.group.saturating_sub(1)))))
                }
                None => o.rows = None,
            }
        }
        if o.group >= o.file.metadata().num_row_groups() {
            return None;
        }
        match open_group(path, o, o.group) {
            Ok(it) => {
                o.rows = Some(it);
                o.group += 1;
            }
            Err(e) => return Some(Err(e)),
        }
    }
}

fn open_group(path: &Path, o: &OpenShard, g: usize) -> Result<ReaderIter> {
    let rg = o.file.get_row_group(g).map_err(|e| file_err(path, format!("row group {g}: {e}")))?;
    TreeBuilder::new()
        .with_batch_size(BATCH_ROWS)
        .as_iter(o.descr.clone(), &*rg)
        .map_err(|e| file_err(path, format!("row group {g}: {e}")))
}

/// Opens a shard positioned at row `start`: whole row groups before it are not read, rows
/// inside its row group are read and dropped.
fn open_shard(path: &Path, start: u64) -> Result<OpenShard> {
    let file = open_footer(path)?;
    let md = file.metadata();
    let root = md.file_metadata().schema_descr().root_schema();
    let names: Vec<&str> = root.get_fields().iter().map(|f| f.name()).collect();
    let missing: Vec<&str> = REQUIRED.iter().copied().filter(|c| !names.contains(c)).collect();
    if !missing.is_empty() {
        return Err(file_err(
            path,
            format!(
                "not a Pick-a-Pic shard: no column(s) {}; it has {}",
                missing.join(", "),
                if names.is_empty() { "none".to_string() } else { names.join(", ") }
            ),
        ));
    }
    let fields: Vec<_> =
        root.get_fields().iter().filter(|f| REQUIRED.contains(&f.name()) || f.name() == HAS_LABEL).cloned().collect();
    // Fail at open, naming the codec, rather than mid-epoch with "disabled feature".
    for g in 0..md.num_row_groups() {
        let rg = md.row_group(g);
        for c in 0..rg.num_columns() {
            let col = rg.column(c);
            let name = col.column_path().string();
            if !fields.iter().any(|f| f.name() == name) {
                continue;
            }
            match col.compression() {
                Compression::UNCOMPRESSED | Compression::SNAPPY => {}
                other => {
                    return Err(file_err(
                        path,
                        format!(
                            "column `{name}` is compressed with {other:?}; vipo reads Snappy (what `datasets` \
                             and pyarrow write by default) and uncompressed shards: rewrite it with \
                             pyarrow.parquet.write_table(table, path, compression='snappy')"
                        ),
                    ))
                }
            }
        }
    }
    let proj = Type::group_type_builder(root.name())
        .with_fields(fields)
        .build()
        .map_err(|e| file_err(path, format!("projection: {e}")))?;
    let descr = Arc::new(SchemaDescriptor::new(Arc::new(proj)));
    // The row group holding `start`, and how many of its rows come before it.
    let mut group = 0;
    let mut skip = start;
    while group < md.num_row_groups() {
        let n = md.row_group(group).num_rows().max(0) as u64;
        if skip < n {
            break;
        }
        skip -= n;
        group += 1;
    }
    let mut o = OpenShard { file, descr, group, rows: None };
    for _ in 0..skip {
        match next_row(path, &mut o) {
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e),
            None => break,
        }
    }
    Ok(o)
}

fn number(path: &Path, col: &str, f: &Field) -> Result<Option<f64>> {
    Ok(match f {
        Field::Null => None,
        Field::Double(v) => Some(*v),
        Field::Float(v) => Some(*v as f64),
        Field::Int(v) => Some(*v as f64),
        Field::Long(v) => Some(*v as f64),
        other => return Err(file_err(path, format!("column `{col}` holds {other}, expected a number"))),
    })
}

fn record(path: &Path, row: Row, index: u64, cursor: Cursor) -> Result<Record> {
    let mut caption = String::new();
    let mut has_label = true;
    let (mut l0, mut l1) = (None, None);
    let (mut j0, mut j1): (Arc<[u8]>, Arc<[u8]>) = (Arc::from(&[][..]), Arc::from(&[][..]));
    for (name, field) in row.into_columns() {
        match (name.as_str(), field) {
            ("caption", Field::Str(s)) => caption = s,
            ("caption", Field::Null) => {}
            (HAS_LABEL, Field::Bool(b)) => has_label = b,
            (HAS_LABEL, Field::Null) => has_label = false,
            ("label_0", f) => l0 = number(path, "label_0", &f)?,
            ("label_1", f) => l1 = number(path, "label_1", &f)?,
            // A null image stays empty: the loader counts it as undecodable.
            ("jpg_0", Field::Bytes(b)) => j0 = Arc::from(b.data()),
            ("jpg_1", Field::Bytes(b)) => j1 = Arc::from(b.data()),
            ("jpg_0" | "jpg_1", Field::Null) => {}
            (col, other) => {
                return Err(file_err(
                    path,
                    format!("row {}: column `{col}` holds an unexpected {other}", cursor_row(&cursor)),
                ))
            }
        }
    }
    let (verdict, chosen_column) = match (has_label, l0, l1) {
        (false, _, _) | (_, None, _) | (_, _, None) => (Verdict::NoLabel, None),
        (true, Some(a), Some(b)) if a == 0.5 && b == 0.5 => (Verdict::Tie, None),
        (true, Some(a), Some(b)) if a == 1.0 && b == 0.0 => (Verdict::Pair, Some(0u8)),
        (true, Some(a), Some(b)) if a == 0.0 && b == 1.0 => (Verdict::Pair, Some(1u8)),
        _ => (Verdict::BadLabel, None),
    };
    let pair = match verdict {
        Verdict::Pair | Verdict::Tie => {
            let (chosen, rejected) = if chosen_column == Some(1) { (j1, j0) } else { (j0, j1) };
            Some(PreferencePair {
                index,
                prompt: caption,
                chosen: ImageSource::Bytes(chosen),
                rejected: ImageSource::Bytes(rejected),
                category: None,
                scores: None,
                tie: verdict == Verdict::Tie,
                cursor: cursor.clone(),
            })
        }
        _ => None,
    };
    Ok(Record { index, cursor, verdict, chosen_column, category: None, pair })
}

fn cursor_row(c: &Cursor) -> u64 {
    match c {
        Cursor::Parquet { row, .. } => *row,
        Cursor::Jsonl { line, .. } => *line,
    }
}
