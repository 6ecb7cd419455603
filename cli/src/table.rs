//! Plain-text tables for the terminal: columns as wide as their widest cell, numbers right-aligned.

/// A table with a header row; `right[i]` aligns column `i` to the right (numbers).
pub struct Table {
    header: Vec<String>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str], right: &[bool]) -> Self {
        Self {
            header: header.iter().map(|h| h.to_string()).collect(),
            right: right.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let width = |i: usize| {
            std::iter::once(&self.header)
                .chain(&self.rows)
                .map(|row| row.get(i).map_or(0, |c| c.chars().count()))
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..self.header.len()).map(width).collect();
        let line = |row: &[String]| {
            let cells: Vec<String> = widths
                .iter()
                .enumerate()
                .map(|(i, &w)| {
                    let cell = row.get(i).map_or("", String::as_str);
                    if self.right.get(i).copied().unwrap_or(false) {
                        format!("{cell:>w$}")
                    } else {
                        format!("{cell:<w$}")
                    }
                })
                .collect();
            cells.join("  ").trim_end().to_owned()
        };
        let mut out = line(&self.header);
        out.push('\n');
        for row in &self.rows {
            out.push_str(&line(row));
            out.push('\n');
        }
        out
    }
}

/// A score in [0, 1] as a percentage and a 10-step bar: `87.3%  #########.`.
pub fn score(value: Option<f64>) -> String {
    match value {
        Some(v) if v.is_finite() => {
            let filled = (v.clamp(0.0, 1.0) * 10.0).round() as usize;
            format!(
                "{:>5.1}%  {}{}",
                v * 100.0,
                "#".repeat(filled),
                ".".repeat(10 - filled)
            )
        }
        _ => "-".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_fit_their_widest_cell_and_numbers_align_right() {
        let mut table = Table::new(&["NAME", "N"], &[false, true]);
        table.row(vec!["amount".into(), "7".into()]);
        table.row(vec!["é".into(), "1234".into()]);
        assert_eq!(table.render(), "NAME       N\namount     7\né       1234\n");
        assert_eq!(score(Some(0.873)), " 87.3%  #########.");
        assert_eq!(score(None), "-");
    }
}
