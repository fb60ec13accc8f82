//! The statement table: every SQL statement of the metadata store, read from
//! `queries/*.sql` (`include_str!`) and expanded for one backend's dialect
//! once, when the store is built.
//!
//! A file holds the statements of one repository, each starting with a
//! `-- name: <statement>` line; other `--` lines are comments. Where the
//! dialects differ, a statement holds a token that [`Dialect::expand`]
//! replaces (the texts are in `TOKENS`):
//! - `{now}`: the current time;
//! - `{later $n}`: the time that the [`Later`](crate::sql::Later) bound as
//!   `$n` stands for;
//! - `{each $n}`: the strings of the JSON array `$n`, as a one-column
//!   `SELECT` (for `x IN ({each $n})`);
//! - `{each_id $n}`: the same for the ids (hyphenated UUID text) of the JSON
//!   array `$n`, for an id column (`run_id IN ({each_id $n})`);
//! - `{skip_locked}`: lock the selected row, skipping rows that other
//!   transactions hold (nothing on SQLite, which has one writer at a time);
//! - `{share_lock}`: lock the selected row against updates until the
//!   transaction ends, waiting for other writers (nothing on SQLite, whose
//!   write transactions exclude each other). Fenced writes take it on the
//!   job's row before they write;
//! - `{update_lock}`: lock the selected row for update, waiting for other
//!   writers (nothing on SQLite);
//! - `{begin}`: the statement that starts a write transaction.
//!
//! A statement call looks its text up by [`Stmt`] (an index into the table:
//! no parsing, no allocation, nothing that can fail), so an unknown or
//! unclosed token, or a statement missing from its file, fails when the
//! store is built, and the unit tests below expand every statement for both
//! dialects.

use sqlx::{AssertSqlSafe, SqlSafeStr, SqlStr};

/// The SQL dialect of a backend (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Postgres,
    Sqlite,
}

/// What each token stands for: (token, on Postgres, on SQLite). In a
/// text with `{}`, the token takes a placeholder (`{later $4}`), which
/// stands where the `{}` is. Postgres reads its own clock (so that workers
/// on machines with skewed clocks agree on lease expiry) and locks rows;
/// SQLite binds the application's clock and has one writer at a time.
const TOKENS: &[(&str, &str, &str)] = &[
    ("now", "now()", "$1"),
    ("later", "now() + make_interval(secs => {})", "{}"),
    (
        "each",
        "SELECT jsonb_array_elements_text({})",
        "SELECT value FROM json_each({})",
    ),
    (
        "each_id",
        "SELECT jsonb_array_elements_text({})::uuid",
        "SELECT value FROM json_each({})",
    ),
    ("skip_locked", "FOR NO KEY UPDATE SKIP LOCKED", ""),
    ("share_lock", "FOR SHARE", ""),
    ("update_lock", "FOR UPDATE", ""),
    ("begin", "BEGIN", "BEGIN IMMEDIATE"),
];

impl Dialect {
    /// Expands the tokens of `template`; Err names an unknown or unclosed
    /// token, or a token with a missing or unexpected placeholder.
    pub fn expand(self, template: &str) -> Result<String, String> {
        let mut out = String::with_capacity(template.len() + 64);
        let mut rest = template;
        while let Some(start) = rest.find('{') {
            if rest[..start].contains('}') {
                return Err(format!("unopened token in {:?}", &rest[..start]));
            }
            out.push_str(&rest[..start]);
            let len = rest[start..]
                .find('}')
                .ok_or_else(|| format!("unclosed token at {:?}", &rest[start..]))?;
            let token = &rest[start + 1..start + len];
            let (name, arg) = token.split_once(' ').unwrap_or((token, ""));
            let Some(&(_, pg, lite)) = TOKENS.iter().find(|(t, ..)| *t == name) else {
                return Err(format!("unknown token {{{token}}}"));
            };
            let text = match self {
                Dialect::Postgres => pg,
                Dialect::Sqlite => lite,
            };
            let placeholder = arg.len() > 1
                && arg.starts_with('$')
                && arg[1..].bytes().all(|b| b.is_ascii_digit());
            match (pg.contains("{}"), placeholder, arg.is_empty()) {
                (true, true, _) => out.push_str(&text.replace("{}", arg)),
                (false, _, true) => out.push_str(text),
                (true, false, _) => {
                    return Err(format!("token {{{token}}} needs a placeholder ($n)"))
                }
                (false, _, false) => return Err(format!("token {{{token}}} takes no argument")),
            }
            rest = &rest[start + len + 1..];
        }
        if let Some(end) = rest.find('}') {
            return Err(format!("unopened token at {:?}", &rest[..=end]));
        }
        out.push_str(rest);
        Ok(out)
    }
}

/// Declares [`Stmt`] (one variant per statement, named as in its file) and
/// the files they come from.
macro_rules! statements {
    ($($file:literal: $($name:ident),+ ;)+) => {
        /// A statement of `queries/*.sql`, by its name there.
        #[allow(non_camel_case_types)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub(crate) enum Stmt { $($($name,)+)+ }

        impl Stmt {
            /// Every statement with its file, in declaration order.
            pub const ALL: &'static [(Stmt, &'static str)] = &[$($((Stmt::$name, $file),)+)+];

            pub fn name(self) -> &'static str {
                match self { $($(Stmt::$name => stringify!($name),)+)+ }
            }
        }

        /// The files: (name, text).
        const FILES: &[(&str, &str)] =
            &[$(($file, include_str!(concat!("../queries/", $file))),)+];
    };
}

statements! {
    "store.sql": begin_write, ping, fence_check, notify;
    "runs.sql": run_insert_idempotent, run_insert, run_by_request, team_lock,
        run_count_in_flight, run_get, run_list_team, run_list_all, run_summaries_of,
        run_choices_of, run_artifacts_of, run_jobs_of, run_count_status, run_set_status,
        run_status_and_driver, run_cancel, run_cancel_jobs, run_summary;
    "run_claims.sql": run_claim, run_claimable, run_claim_locked, run_renew, run_release;
    "jobs.sql": job_queue_stats, job_insert, job_by_stage, job_get, job_list,
        job_fail_expired, job_lease, job_next_lease_at, job_heartbeat, job_complete,
        job_end_attempt, job_release;
    "results.sql": metric_upsert, metric_list, neuron_stats_insert,
        neuron_stats_on_conflict, neuron_stats_list, curve_insert, curve_on_conflict,
        curve_list, choice_upsert, choice_list, scan_result_upsert, scan_result_get;
    "artifacts.sql": artifact_upsert, artifact_get, artifact_list, artifact_delete;
    "events.sql": event_lock, event_insert, event_list;
    "access.sql": team_insert, team_list, api_key_insert, api_key_list, api_key_revoke,
        api_key_set_expiry, api_key_by_hash, api_key_touch;
}

/// The named statements of one file: (name, text without comments).
fn parse(file: &str, text: &'static str) -> Result<Vec<(&'static str, String)>, String> {
    let mut out: Vec<(&'static str, String)> = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if let Some(name) = trimmed.strip_prefix("-- name:") {
            let name = name.trim();
            if name.is_empty() || out.iter().any(|(n, _)| *n == name) {
                return Err(format!("{file}: empty or repeated statement name {name:?}"));
            }
            out.push((name, String::new()));
        } else if trimmed.starts_with("--") || trimmed.is_empty() {
            continue;
        } else if let Some((_, body)) = out.last_mut() {
            if !body.is_empty() {
                body.push('\n');
            }
            body.push_str(trimmed);
        } else {
            return Err(format!("{file}: SQL before the first `-- name:` line"));
        }
    }
    for (name, body) in &mut out {
        let b = body.trim_end().trim_end_matches(';');
        if b.is_empty() {
            return Err(format!("{file}: statement {name} is empty"));
        }
        *body = b.to_string();
    }
    Ok(out)
}

/// Every statement of [`Stmt`], expanded for one dialect.
#[derive(Debug)]
pub(crate) struct Statements {
    texts: Vec<SqlStr>,
}

impl Statements {
    /// Reads every file and expands every statement for `dialect`; Err
    /// names the first statement that is missing, not declared, or has a
    /// bad token.
    pub fn build(dialect: Dialect) -> Result<Statements, String> {
        let mut parsed = Vec::new();
        for (file, text) in FILES {
            for (name, body) in parse(file, text)? {
                if !Stmt::ALL.iter().any(|(s, f)| f == file && s.name() == name) {
                    return Err(format!("{file}: statement {name} is not declared in Stmt"));
                }
                parsed.push((*file, name, body));
            }
        }
        let mut texts = Vec::with_capacity(Stmt::ALL.len());
        for (i, (stmt, file)) in Stmt::ALL.iter().enumerate() {
            debug_assert_eq!(*stmt as usize, i);
            let (.., body) = parsed
                .iter()
                .find(|(f, n, _)| f == file && *n == stmt.name())
                .ok_or_else(|| format!("{file}: statement {} is missing", stmt.name()))?;
            let sql = dialect
                .expand(body)
                .map_err(|e| format!("{file}: statement {}: {e}", stmt.name()))?;
            texts.push(AssertSqlSafe(std::sync::Arc::<str>::from(sql)).into_sql_str());
        }
        Ok(Statements { texts })
    }

    /// The text of `stmt` (a reference-counted clone: no copy).
    pub fn get(&self, stmt: Stmt) -> SqlStr {
        // `build` filled one entry per statement, in declaration order
        self.texts[stmt as usize].clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dialects_expand_tokens() {
        let (pg, lite) = (Dialect::Postgres, Dialect::Sqlite);
        let t = "a = {now}, b = {later $3} WHERE x IN ({each $4}) {skip_locked}";
        assert_eq!(
            pg.expand(t).unwrap(),
            "a = now(), b = now() + make_interval(secs => $3) \
             WHERE x IN (SELECT jsonb_array_elements_text($4)) FOR NO KEY UPDATE SKIP LOCKED"
        );
        assert_eq!(
            lite.expand(t).unwrap(),
            "a = $1, b = $3 WHERE x IN (SELECT value FROM json_each($4)) "
        );
        assert_eq!(
            pg.expand("SELECT 1 {share_lock}").unwrap(),
            "SELECT 1 FOR SHARE"
        );
        assert_eq!(
            pg.expand("SELECT 1 {update_lock}").unwrap(),
            "SELECT 1 FOR UPDATE"
        );
        assert_eq!(lite.expand("SELECT 1 {update_lock}").unwrap(), "SELECT 1 ");
        assert_eq!(
            pg.expand("id IN ({each_id $1})").unwrap(),
            "id IN (SELECT jsonb_array_elements_text($1)::uuid)"
        );
        assert_eq!(lite.expand("{begin}").unwrap(), "BEGIN IMMEDIATE");
        assert_eq!(pg.expand("SELECT 1").unwrap(), "SELECT 1");
    }

    #[test]
    fn bad_tokens_are_refused() {
        for bad in [
            "SELECT {nope}",
            "SELECT {now",
            "SELECT now}",
            "x IN ({each})",
            "x IN ({each 4})",
            "x IN ({each $})",
            "{now $1}",
            "a } b {now}",
        ] {
            for d in [Dialect::Postgres, Dialect::Sqlite] {
                assert!(d.expand(bad).is_err(), "{d:?}: {bad}");
            }
        }
    }

    #[test]
    fn files_parse_into_named_statements() {
        let parsed = parse(
            "t.sql",
            "-- a comment\n-- name: one\nSELECT 1\n  FROM x;\n\n-- name: two\n-- note\nSELECT 2\n",
        )
        .unwrap();
        assert_eq!(
            parsed,
            vec![
                ("one", "SELECT 1\nFROM x".to_string()),
                ("two", "SELECT 2".into())
            ]
        );
        assert!(parse("t.sql", "SELECT 1").is_err());
        assert!(parse("t.sql", "-- name: a\nSELECT 1\n-- name: a\nSELECT 2").is_err());
        assert!(parse("t.sql", "-- name: a\n-- name: b\nSELECT 2").is_err());
    }

    /// Every statement of every file expands for both backends, and every
    /// file's statements are the declared ones.
    #[test]
    fn every_statement_expands_for_both_dialects() {
        for (backend, dialect) in [
            (
                "postgres",
                <sqlx::Postgres as crate::backend::Backend>::DIALECT,
            ),
            ("sqlite", <sqlx::Sqlite as crate::backend::Backend>::DIALECT),
        ] {
            let table = Statements::build(dialect).unwrap_or_else(|e| panic!("{backend}: {e}"));
            assert_eq!(table.texts.len(), Stmt::ALL.len());
            for (stmt, _) in Stmt::ALL {
                let sql = table.get(*stmt);
                let sql = sql.as_str();
                assert!(!sql.contains(['{', '}']), "{backend} {stmt:?}: {sql}");
                assert!(!sql.trim().is_empty(), "{backend} {stmt:?}");
            }
        }
        let pg = Statements::build(Dialect::Postgres).unwrap();
        assert!(pg.get(Stmt::fence_check).as_str().ends_with("FOR SHARE"));
        assert_eq!(pg.get(Stmt::begin_write).as_str(), "BEGIN");
        let lite = Statements::build(Dialect::Sqlite).unwrap();
        assert_eq!(lite.get(Stmt::begin_write).as_str(), "BEGIN IMMEDIATE");
        assert!(lite
            .get(Stmt::job_lease)
            .as_str()
            .contains("lease_expires_at = $4"));
    }
}
