//! A small aligned-column table printer for people.

/// How a column's cells line up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// Rows of cells under a header, rendered with columns padded to their widest cell and
/// separated by two spaces. The last column is never padded (no trailing blanks).
#[derive(Debug, Clone)]
pub struct Table {
    headers: Vec<String>,
    align: Vec<Align>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers, all left-aligned.
    pub fn new(headers: &[&str]) -> Self {
        Table {
            headers: headers.iter().map(|h| (*h).to_owned()).collect(),
            align: vec![Align::Left; headers.len()],
            rows: Vec::new(),
        }
    }

    /// Right-aligns the columns at these indexes (numbers read better that way).
    pub fn right(mut self, columns: &[usize]) -> Self {
        for &c in columns {
            if let Some(a) = self.align.get_mut(c) {
                *a = Align::Right;
            }
        }
        self
    }

    /// Adds a row; missing cells are blank and extra cells are dropped.
    pub fn row<I, S>(&mut self, cells: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut row: Vec<String> = cells.into_iter().map(Into::into).collect();
        row.resize(self.headers.len(), String::new());
        self.rows.push(row);
    }

    /// The table as text, one line per row after the header, each ending in `\n`.
    pub fn render(&self) -> String {
        let width = |s: &str| s.chars().count();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| width(h)).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(width(cell));
            }
        }
        let mut out = String::new();
        for line in std::iter::once(&self.headers).chain(&self.rows) {
            let last = line.len().saturating_sub(1);
            let mut text = String::new();
            for (i, cell) in line.iter().enumerate() {
                if i > 0 {
                    text.push_str("  ");
                }
                let pad = widths[i] - width(cell);
                match self.align[i] {
                    Align::Right => {
                        text.extend(std::iter::repeat_n(' ', pad));
                        text.push_str(cell);
                    }
                    Align::Left => {
                        text.push_str(cell);
                        if i != last {
                            text.extend(std::iter::repeat_n(' ', pad));
                        }
                    }
                }
            }
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns() {
        let mut t = Table::new(&["ID", "NAME", "COUNT"]).right(&[0, 2]);
        t.row(["1", "main", "12345"]);
        t.row(["10", "sqlite3_step", "7"]);
        assert_eq!(
            t.render(),
            "ID  NAME          COUNT\n 1  main          12345\n10  sqlite3_step      7\n"
        );
    }

    #[test]
    fn last_column_is_not_padded_and_rows_are_normalized() {
        let mut t = Table::new(&["A", "B"]);
        t.row(["xxxx", "1"]);
        t.row(["y"]);
        t.row(["z", "2", "ignored"]);
        assert_eq!(t.render(), "A     B\nxxxx  1\ny\nz     2\n");
    }

    #[test]
    fn counts_characters_not_bytes() {
        let mut t = Table::new(&["N", "V"]);
        t.row(["é", "1"]);
        t.row(["ab", "2"]);
        assert_eq!(t.render(), "N   V\né   1\nab  2\n");
    }

    #[test]
    fn empty_table_is_just_the_header() {
        let t = Table::new(&["A", "B"]);
        assert_eq!(t.render(), "A  B\n");
    }
}
