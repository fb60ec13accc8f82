//! The one report writer. Every report (the experiment's
//! [`crate::pipeline::report::Report`], the scan's and the repair's) is a
//! JSON-able value with a Markdown rendering, written into its folder as
//! `report.json` (pretty JSON) and `report.md`, each atomically.

use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::data::idx::write_atomic;
use crate::error::{Error, Result};

/// A report: JSON for machines, Markdown for people.
pub trait Document: Serialize {
    /// What the report is ("a scan report"), for messages.
    const WHAT: &'static str;

    /// The Markdown rendering (`report.md`).
    fn to_markdown(&self) -> String;

    /// The pretty JSON (`report.json`).
    fn to_json(&self) -> String {
        serde_json::to_string_pretty(self)
            .unwrap_or_else(|e| panic!("{} serializes to JSON: {e}", Self::WHAT))
    }

    /// Writes `report.json` and `report.md` into `dir` (made if missing).
    fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        write_atomic(&dir.join("report.json"), self.to_json().as_bytes())?;
        write_atomic(&dir.join("report.md"), self.to_markdown().as_bytes())
    }
}

/// Appends a `## Figures` section linking each figure by its file name
/// (the figures lie beside the report).
pub fn figures_beside(s: &mut String, figures: &[PathBuf]) {
    let _ = writeln!(s, "## Figures\n");
    for f in figures {
        let rel = f
            .file_name()
            .map(PathBuf::from)
            .unwrap_or_else(|| f.clone());
        let _ = writeln!(s, "![{}]({})", rel.display(), rel.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Toy {
        n: u32,
        figures: Vec<PathBuf>,
    }

    impl Document for Toy {
        const WHAT: &'static str = "a toy report";
        fn to_markdown(&self) -> String {
            let mut s = format!("# toy {}\n\n", self.n);
            figures_beside(&mut s, &self.figures);
            s
        }
    }

    #[test]
    fn writes_json_and_markdown_into_a_new_folder() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("a/b");
        let toy = Toy {
            n: 7,
            figures: vec![out.join("hist.png"), PathBuf::from("x/y.png")],
        };
        toy.write(&out).unwrap();
        let json = std::fs::read_to_string(out.join("report.json")).unwrap();
        assert_eq!(json, serde_json::to_string_pretty(&toy).unwrap());
        assert!(json.contains("\n  \"n\": 7"), "pretty: {json}");
        let md = std::fs::read_to_string(out.join("report.md")).unwrap();
        assert_eq!(
            md,
            "# toy 7\n\n## Figures\n\n![hist.png](hist.png)\n![y.png](y.png)\n"
        );
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        let e = toy.write(&file).unwrap_err();
        assert!(e.to_string().contains("file"), "{e}");
    }
}
