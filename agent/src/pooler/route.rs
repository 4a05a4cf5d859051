//! Read/write split: which statements may run on a hot standby.
//!
//! The SQL is parsed with `sqlparser` (PostgreSQL dialect), never matched
//! with patterns. A statement list reads only when every statement is a
//! query (`SELECT`, `VALUES`, `TABLE`, `WITH ... SELECT`) with no locking
//! clause (`FOR UPDATE`/`FOR SHARE`), no `SELECT INTO`, no data-modifying
//! CTE and no call to a function with side effects (`nextval`, advisory
//! locks, plus `pooler.primary_functions`). `BEGIN`/`START TRANSACTION
//! READ ONLY` opens a transaction that may run on a standby. Anything the
//! parser does not understand goes to the primary.
//!
//! Session pools with the split also need to know what a statement leaves
//! behind in the session ([`SessionEffect`]): a session setting the pooler
//! mirrors on the session's standby connection, a write, or state only the
//! primary's connection can hold (temporary objects, LISTEN, SQL-level
//! PREPARE, cursors, advisory locks, `set_config`), after which the
//! session stops using its standby.

use std::{
    collections::{HashMap, HashSet},
    ops::ControlFlow,
    sync::Mutex,
};

use sqlparser::{
    ast::{
        Expr, ObjectNamePart, Query, SetExpr, Statement, TransactionAccessMode, TransactionMode,
        Visit, Visitor,
    },
    dialect::PostgreSqlDialect,
    parser::Parser,
    tokenizer::{Token, Tokenizer},
};

/// Functions that write or take locks even inside a SELECT.
const SIDE_EFFECT_FUNCTIONS: &[&str] = &[
    "nextval",
    "setval",
    "lastval",
    "currval",
    "pg_advisory_lock",
    "pg_advisory_xact_lock",
    "pg_try_advisory_lock",
    "pg_try_advisory_xact_lock",
    "pg_advisory_lock_shared",
    "pg_advisory_xact_lock_shared",
    "pg_try_advisory_lock_shared",
    "pg_try_advisory_xact_lock_shared",
    "pg_advisory_unlock",
    "pg_advisory_unlock_shared",
    "pg_advisory_unlock_all",
    "pg_notify",
    "txid_current",
    "pg_current_xact_id",
    "set_config",
    "dblink_exec",
];

/// Where a transaction may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Primary,
    /// A standby: a read-only statement, or a READ ONLY transaction.
    Standby,
}

/// What a statement (list) leaves behind in a session, for session pools
/// with the split (`session_split`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEffect {
    /// Only reads (or `BEGIN READ ONLY`): may run on the standby.
    Read,
    /// One session-level `SET`/`RESET`: runs on the primary and is
    /// replayed on the session's standby connection. `key` names what it
    /// sets, so a later setting of the same key replaces it; `*` is
    /// `RESET ALL`, which replaces every earlier one.
    Setting { key: Box<str> },
    /// A statement list with session settings among its statements
    /// (`BEGIN READ ONLY; SET ...; COMMIT`): the text cannot be replayed
    /// alone, so the values of `keys` are read back from the connection
    /// that ran it; `write` when another statement of it writes.
    Settings { keys: Box<[Box<str>]>, write: bool },
    /// Nothing outlives the transaction: `SET LOCAL`, `SET TRANSACTION`,
    /// `COMMIT`, `ROLLBACK`, savepoints, `SHOW`.
    Transactional,
    /// Changes data or schema, leaves nothing in the session: the session
    /// reads from the primary afterwards only with `read_your_writes`.
    Write,
    /// Leaves state only this server connection has (temporary objects,
    /// LISTEN, SQL PREPARE, cursors, advisory locks, `set_config`, or a
    /// statement the parser does not know): the session stops using its
    /// standby.
    SessionState,
    /// `DISCARD ALL`: the session starts afresh (settings, prepared
    /// statements, temporary objects).
    DiscardAll,
    /// `DEALLOCATE ALL`: the connection's prepared statements are gone
    /// (the pooler's renamed ones too), nothing else changes.
    DeallocateAll,
}

/// Functions whose effect lasts the session (the standby cannot see it).
const SESSION_STATE_FUNCTIONS: &[&str] = &[
    "set_config",
    "pg_advisory_lock",
    "pg_try_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock_shared",
    "pg_advisory_unlock",
    "pg_advisory_unlock_shared",
    "pg_advisory_unlock_all",
    "dblink_connect",
];

/// A remembered decision: where a transaction starting with the text
/// runs, and what the text leaves in a session.
#[derive(Debug, Clone)]
pub struct Decision {
    pub target: Target,
    pub effect: SessionEffect,
}

/// Statement texts whose decision is remembered; the cache is emptied
/// when full (statements with inlined literals never repeat, and must not
/// crowd out the ones that do for ever).
const CACHED_DECISIONS: usize = 4096;
/// Longer statements are parsed every time rather than kept.
const CACHED_STATEMENT_BYTES: usize = 2048;

/// Decides targets; holds the lower-cased side-effect function names and
/// the decisions made per statement text (parsing costs tens of
/// microseconds, a lookup well under one; drivers and prepared statements
/// send the same texts again and again).
#[derive(Debug)]
pub struct Router {
    primary_functions: HashSet<String>,
    decisions: Mutex<HashMap<Box<str>, Decision>>,
}

impl Router {
    pub fn new(extra_primary_functions: &[String]) -> Router {
        let mut primary_functions: HashSet<String> = SIDE_EFFECT_FUNCTIONS
            .iter()
            .map(|f| (*f).to_owned())
            .collect();
        primary_functions.extend(extra_primary_functions.iter().map(|f| f.to_lowercase()));
        Router {
            primary_functions,
            decisions: Mutex::new(HashMap::new()),
        }
    }

    /// The target of a transaction that starts with `sql`, from the cache
    /// when this text was decided before.
    pub fn route(&self, sql: &str) -> Target {
        self.decision(sql).target
    }

    /// The whole decision about `sql` (target and session effect), from
    /// the cache when a text of the same shape was decided before.
    pub fn decision(&self, sql: &str) -> Decision {
        if sql.len() > CACHED_STATEMENT_BYTES {
            return self.decide(sql);
        }
        // A decision never depends on the values of literals (only on
        // statement kinds, function names and clauses), so statements
        // that differ only in inlined values share one: pgbench -S, ORMs
        // without bind parameters.
        let shape = literal_shape(sql);
        let key = shape.as_deref().unwrap_or(sql);
        if let Some(decision) = self.lock_decisions().get(key) {
            return decision.clone();
        }
        let decision = self.decide(sql);
        let mut decisions = self.lock_decisions();
        if decisions.len() >= CACHED_DECISIONS {
            decisions.clear();
        }
        decisions.insert(key.into(), decision.clone());
        decision
    }

    fn lock_decisions(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Decision>> {
        // A map of plain values cannot be left inconsistent by a panic.
        self.decisions
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Parses `sql` and decides.
    fn decide(&self, sql: &str) -> Decision {
        let Ok(statements) = Parser::parse_sql(&PostgreSqlDialect {}, sql) else {
            // sqlparser has no RESET; anything else it cannot read is
            // kept on the primary and ends the standby's use.
            let effect = reset_key(sql).map_or(SessionEffect::SessionState, |key| {
                SessionEffect::Setting { key }
            });
            return Decision {
                target: Target::Primary,
                effect,
            };
        };
        let target = self.target(&statements);
        let effect = if target == Target::Standby && statements.len() == 1 {
            SessionEffect::Read
        } else if target == Target::Standby {
            // A READ ONLY block in one text: only its settings matter.
            match statement_list_effect(&statements[1..]) {
                SessionEffect::Write => SessionEffect::Read,
                SessionEffect::Settings { keys, .. } => {
                    SessionEffect::Settings { keys, write: false }
                }
                effect => effect,
            }
        } else {
            session_effect(&statements)
        };
        Decision { target, effect }
    }

    fn target(&self, statements: &[Statement]) -> Target {
        if let Some(Statement::StartTransaction { modes, .. }) = statements.first() {
            let read_only = modes.contains(&TransactionMode::AccessMode(
                TransactionAccessMode::ReadOnly,
            ));
            return if read_only {
                Target::Standby
            } else {
                Target::Primary
            };
        }
        if statements.is_empty() || !statements.iter().all(|s| matches!(s, Statement::Query(_))) {
            return Target::Primary;
        }
        let mut check = ReadOnlyCheck {
            primary_functions: &self.primary_functions,
        };
        let breaks = statements
            .iter()
            .any(|statement| statement.visit(&mut check).is_break());
        if breaks {
            Target::Primary
        } else {
            Target::Standby
        }
    }
}

/// `sql` with its number and plain string literals each replaced by a NUL
/// (a byte no statement text can hold, so a shape never equals a real
/// text), or `None` when it has no literal or anything this one pass does
/// not read with certainty: comments, backslashes, dollar quoting, strings
/// with a prefix (`E'...'`, `B'...'`), an unterminated quote. Those are
/// remembered by their own text, as before. `$1` parameters, identifiers
/// (`t1`, `"Col 2"`) and everything else are kept as they are.
fn literal_shape(sql: &str) -> Option<String> {
    fn in_word(byte: u8) -> bool {
        byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'$' || byte >= 0x80
    }
    /// Where the quoted run opened at `start` ends (after its closing
    /// quote); a doubled quote inside is an escaped one.
    fn quoted_end(bytes: &[u8], start: usize) -> Option<usize> {
        let quote = bytes[start];
        let mut at = start + 1;
        loop {
            match bytes.get(at) {
                None => return None,
                Some(&b) if b == quote && bytes.get(at + 1) == Some(&quote) => at += 2,
                Some(&b) if b == quote => return Some(at + 1),
                Some(_) => at += 1,
            }
        }
    }
    let bytes = sql.as_bytes();
    let mut shape = Vec::with_capacity(bytes.len());
    let mut masked = false;
    let mut at = 0;
    while at < bytes.len() {
        let byte = bytes[at];
        let after_word = at > 0 && in_word(bytes[at - 1]);
        let next = bytes.get(at + 1).copied();
        match byte {
            b'\\' => return None,
            b'-' if next == Some(b'-') => return None,
            b'/' if next == Some(b'*') => return None,
            b'$' if !next.is_some_and(|b| b.is_ascii_digit()) => return None,
            b'\'' => {
                if after_word {
                    return None;
                }
                at = quoted_end(bytes, at)?;
                shape.push(0);
                masked = true;
                continue;
            }
            b'"' => {
                let end = quoted_end(bytes, at)?;
                shape.extend_from_slice(&bytes[at..end]);
                at = end;
                continue;
            }
            b'0'..=b'9' if !after_word => {
                while bytes.get(at).is_some_and(|b| b.is_ascii_digit()) {
                    at += 1;
                }
                shape.push(0);
                masked = true;
                continue;
            }
            _ => shape.push(byte),
        }
        at += 1;
    }
    if !masked {
        return None;
    }
    String::from_utf8(shape).ok()
}

/// `RESET name` or `RESET ALL` (read with sqlparser's tokenizer; its
/// parser has no RESET): the setting's key, `*` for ALL.
fn reset_key(sql: &str) -> Option<Box<str>> {
    let tokens = Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize().ok()?;
    let mut words = tokens
        .iter()
        .filter(|t| !matches!(t, Token::Whitespace(_) | Token::SemiColon));
    let Some(Token::Word(first)) = words.next() else {
        return None;
    };
    if !first.value.eq_ignore_ascii_case("reset") {
        return None;
    }
    let mut name = String::new();
    for token in words {
        match token {
            Token::Word(word) if word.quote_style.is_none() => {
                name.push_str(&word.value.to_lowercase())
            }
            Token::Word(word) => name.push_str(&word.value),
            Token::Period => name.push('.'),
            _ => return None,
        }
    }
    match name.as_str() {
        "" => None,
        "all" => Some("*".into()),
        _ => Some(name.into()),
    }
}

/// What a statement list that does not only read leaves in a session.
fn session_effect(statements: &[Statement]) -> SessionEffect {
    use sqlparser::ast::{ContextModifier, DiscardObject, Set};
    let [statement] = statements else {
        return statement_list_effect(statements);
    };
    let mut calls = CallsSessionFunction;
    if statement.visit(&mut calls).is_break() {
        return SessionEffect::SessionState;
    }
    let setting = |key: String| SessionEffect::Setting { key: key.into() };
    match statement {
        Statement::Set(set) => match set {
            Set::SingleAssignment {
                scope: Some(ContextModifier::Local),
                ..
            }
            | Set::SetTimeZone { local: true, .. }
            | Set::SetRole {
                context_modifier: Some(ContextModifier::Local),
                ..
            }
            | Set::SetTransaction { session: false, .. } => SessionEffect::Transactional,
            Set::SingleAssignment { variable, .. } => setting(variable.to_string().to_lowercase()),
            Set::SetTimeZone { .. } => setting("timezone".into()),
            Set::SetRole { .. } => setting("role".into()),
            Set::SetNames { .. } => setting("client_encoding".into()),
            Set::SetTransaction { session: true, .. } => setting("session characteristics".into()),
            _ => SessionEffect::SessionState,
        },
        // They end or mark what ran before them, which decided already (a
        // COMMIT ending a read-only transaction on the standby is no write).
        Statement::Commit { .. }
        | Statement::Rollback { .. }
        | Statement::Savepoint { .. }
        | Statement::ReleaseSavepoint { .. }
        | Statement::ShowVariable { .. } => SessionEffect::Transactional,
        // EXPLAIN ANALYZE runs the statement.
        Statement::Explain { .. } => SessionEffect::Write,
        Statement::Discard {
            object_type: DiscardObject::ALL,
        } => SessionEffect::DiscardAll,
        Statement::Deallocate { name, .. }
            if name.quote_style.is_none() && name.value.eq_ignore_ascii_case("all") =>
        {
            SessionEffect::DeallocateAll
        }
        Statement::Query(query) => match query.body.as_ref() {
            SetExpr::Select(select) if select.into.as_ref().is_some_and(|i| i.temporary) => {
                SessionEffect::SessionState
            }
            _ => SessionEffect::Write,
        },
        Statement::CreateTable(table) if !table.temporary => SessionEffect::Write,
        Statement::CreateView { temporary, .. } | Statement::CreateSequence { temporary, .. }
            if !*temporary =>
        {
            SessionEffect::Write
        }
        Statement::Insert(_)
        | Statement::Update { .. }
        | Statement::Delete(_)
        | Statement::Merge { .. }
        | Statement::Truncate { .. }
        | Statement::Copy { .. }
        | Statement::StartTransaction { .. }
        | Statement::CreateIndex(_)
        | Statement::CreateSchema { .. }
        | Statement::AlterTable { .. }
        | Statement::Drop { .. }
        | Statement::Grant { .. }
        | Statement::Revoke { .. }
        | Statement::Comment { .. }
        | Statement::Analyze { .. }
        | Statement::Vacuum(_) => SessionEffect::Write,
        _ => SessionEffect::SessionState,
    }
}

/// What several statements sent in one text leave: their settings are
/// read back (the text cannot be replayed alone); state only a connection
/// holds ends the standby's use; else a write (a statement list is
/// treated as one, even when it only reads).
fn statement_list_effect(statements: &[Statement]) -> SessionEffect {
    let mut keys: Vec<Box<str>> = Vec::new();
    for statement in statements {
        match session_effect(std::slice::from_ref(statement)) {
            SessionEffect::Setting { key } => keys.push(key),
            SessionEffect::Write | SessionEffect::Transactional | SessionEffect::Read => {}
            _ => return SessionEffect::SessionState,
        }
    }
    if keys.is_empty() {
        SessionEffect::Write
    } else {
        SessionEffect::Settings {
            keys: keys.into(),
            write: true,
        }
    }
}

/// Breaks on a call to a function whose effect lasts the session.
struct CallsSessionFunction;

impl Visitor for CallsSessionFunction {
    type Break = ();

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        if let Expr::Function(function) = expr {
            if let Some(ObjectNamePart::Identifier(ident)) = function.name.0.last() {
                let name = ident.value.to_lowercase();
                if SESSION_STATE_FUNCTIONS.contains(&name.as_str()) {
                    return ControlFlow::Break(());
                }
            }
        }
        ControlFlow::Continue(())
    }
}

/// Breaks on anything that writes.
struct ReadOnlyCheck<'a> {
    primary_functions: &'a HashSet<String>,
}

impl Visitor for ReadOnlyCheck<'_> {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if !query.locks.is_empty() {
            return ControlFlow::Break(());
        }
        match query.body.as_ref() {
            SetExpr::Select(select) if select.into.is_some() => ControlFlow::Break(()),
            SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Delete(_) | SetExpr::Merge(_) => {
                ControlFlow::Break(())
            }
            _ => ControlFlow::Continue(()),
        }
    }

    fn pre_visit_statement(&mut self, statement: &Statement) -> ControlFlow<()> {
        if matches!(statement, Statement::Query(_)) {
            ControlFlow::Continue(())
        } else {
            ControlFlow::Break(())
        }
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        if let Expr::Function(function) = expr {
            if let Some(ObjectNamePart::Identifier(ident)) = function.name.0.last() {
                if self.primary_functions.contains(&ident.value.to_lowercase()) {
                    return ControlFlow::Break(());
                }
            }
        }
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_go_to_a_standby_and_everything_else_to_the_primary() {
        let router = Router::new(&["audit_log".to_owned()]);
        for sql in [
            "SELECT 1",
            "select abalance from pgbench_accounts where aid = $1",
            "WITH t AS (SELECT 1) SELECT * FROM t",
            "SELECT count(*) FROM a JOIN b USING (id); SELECT 2",
            "BEGIN READ ONLY",
            "START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY",
            "VALUES (1), (2)",
        ] {
            assert_eq!(router.route(sql), Target::Standby, "{sql}");
        }
        for sql in [
            "INSERT INTO t VALUES (1)",
            "UPDATE t SET a = 1",
            "SELECT * FROM t FOR UPDATE",
            "SELECT 1 INTO new_table",
            "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
            "SELECT nextval('s')",
            "SELECT Audit_Log('x')",
            "SELECT 1; INSERT INTO t VALUES (1)",
            "BEGIN",
            "CREATE TABLE t (a int)",
            "SET search_path = x",
            "this is not sql",
            "",
        ] {
            assert_eq!(router.route(sql), Target::Primary, "{sql}");
        }
    }

    #[test]
    fn decisions_come_from_the_cache_and_the_cache_stays_bounded() {
        let router = Router::new(&[]);
        for _ in 0..3 {
            assert_eq!(router.route("SELECT 1"), Target::Standby);
            assert_eq!(router.route("INSERT INTO t VALUES (1)"), Target::Primary);
        }
        assert_eq!(router.lock_decisions().len(), 2);
        // A remembered decision is what is answered (the parser is not
        // asked again), for every statement of that shape.
        router.lock_decisions().insert(
            "SELECT \0".into(),
            Decision {
                target: Target::Primary,
                effect: SessionEffect::Write,
            },
        );
        assert_eq!(router.route("SELECT 1"), Target::Primary);
        assert_eq!(router.route("SELECT 42"), Target::Primary);
        for i in 0..CACHED_DECISIONS + 10 {
            router.route(&format!("SELECT c{i} FROM t"));
        }
        assert!(router.lock_decisions().len() <= CACHED_DECISIONS);
        let long = format!("SELECT '{}'", "x".repeat(CACHED_STATEMENT_BYTES));
        assert_eq!(router.route(&long), Target::Standby);
        assert!(!router.lock_decisions().contains_key(long.as_str()));
    }

    #[test]
    fn statements_differing_only_in_literals_share_one_decision() {
        let shape = |sql: &str| literal_shape(sql);
        assert_eq!(
            shape("SELECT abalance FROM pgbench_accounts WHERE aid = 4711;").as_deref(),
            Some("SELECT abalance FROM pgbench_accounts WHERE aid = \0;")
        );
        assert_eq!(
            shape("SELECT * FROM t1 WHERE name = 'O''Brien' AND x > 1.5"),
            shape("SELECT * FROM t1 WHERE name = 'x' AND x > 2.0")
        );
        // Identifiers and parameters stay; a statement without literals
        // is its own key.
        assert_eq!(
            shape(r#"SELECT "Col 2", c3 FROM "t""x" WHERE a = $1 AND b = 7"#).as_deref(),
            Some(concat!(
                r#"SELECT "Col 2", c3 FROM "t""x" WHERE a = $1 AND b = "#,
                "\0"
            ))
        );
        assert_eq!(shape("SELECT a FROM t WHERE b = $1"), None);
        // Whatever one pass cannot read with certainty keeps its own text.
        for sql in [
            r"SELECT 'a\'; DELETE FROM t; --'",
            "SELECT 1 -- a comment",
            "SELECT /* c */ 1",
            "SELECT $$x$$",
            "SELECT E'it''s'",
            "SELECT x'1F'",
            "SELECT 'unterminated",
        ] {
            assert_eq!(shape(sql), None, "{sql}");
        }
        // The value of a literal never changes the decision, the rest does.
        let router = Router::new(&[]);
        assert_eq!(
            router.route("SELECT 1 FROM t WHERE a = 'x'"),
            Target::Standby
        );
        assert_eq!(
            router.route("SELECT 2 FROM t WHERE a = 'y'"),
            Target::Standby
        );
        assert_eq!(router.lock_decisions().len(), 1);
        assert_eq!(
            router.route("SELECT 1 FROM t WHERE a = 'x'; DELETE FROM t WHERE a = 'x'"),
            Target::Primary
        );
        assert_eq!(router.route("SELECT nextval('s')"), Target::Primary);
        assert_eq!(router.route("SELECT upper('s')"), Target::Standby);
        let setting = router.decision("SET application_name = 'one'");
        assert_eq!(
            router.decision("SET application_name = 'two'").effect,
            setting.effect
        );
    }

    #[test]
    fn session_effects_tell_settings_writes_and_state_the_standby_cannot_see() {
        let router = Router::new(&["audit_log".to_owned()]);
        let effect = |sql: &str| router.decision(sql).effect;
        let setting = |key: &str| SessionEffect::Setting { key: key.into() };
        assert_eq!(effect("SELECT 1"), SessionEffect::Read);
        assert_eq!(effect("BEGIN READ ONLY"), SessionEffect::Read);
        assert_eq!(
            effect("SET application_name = 'x'"),
            setting("application_name")
        );
        assert_eq!(
            effect("set SESSION Search_Path TO a, b"),
            setting("search_path")
        );
        assert_eq!(effect("SET TIME ZONE 'UTC'"), setting("timezone"));
        assert_eq!(effect("SET ROLE app"), setting("role"));
        assert_eq!(
            effect("RESET application_name"),
            setting("application_name")
        );
        assert_eq!(effect("reset ALL"), setting("*"));
        assert_eq!(
            effect("SET LOCAL work_mem = '8MB'"),
            SessionEffect::Transactional
        );
        assert_eq!(
            effect("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"),
            SessionEffect::Transactional
        );
        assert_eq!(effect("DISCARD ALL"), SessionEffect::DiscardAll);
        assert_eq!(effect("DEALLOCATE ALL"), SessionEffect::DeallocateAll);
        assert_eq!(
            effect("DEALLOCATE PREPARE all"),
            SessionEffect::DeallocateAll
        );
        assert_eq!(effect("DEALLOCATE p1"), SessionEffect::SessionState);
        assert_eq!(effect("COMMIT"), SessionEffect::Transactional);
        assert_eq!(effect("SHOW search_path"), SessionEffect::Transactional);
        assert_eq!(
            effect("EXPLAIN ANALYZE INSERT INTO t VALUES (1)"),
            SessionEffect::Write
        );
        assert_eq!(
            effect("ROLLBACK TO SAVEPOINT a"),
            SessionEffect::Transactional
        );
        for sql in [
            "INSERT INTO t VALUES (1)",
            "UPDATE t SET a = 1",
            "DELETE FROM t",
            "BEGIN",
            "CREATE TABLE t (a int)",
            "SELECT nextval('s')",
            "SELECT audit_log('x')",
            "SELECT * FROM t FOR UPDATE",
            "INSERT INTO t VALUES (1); UPDATE t SET a = 2",
        ] {
            assert_eq!(effect(sql), SessionEffect::Write, "{sql}");
        }
        for sql in [
            "CREATE TEMP TABLE t (a int)",
            "CREATE TEMPORARY VIEW v AS SELECT 1",
            "SELECT 1 INTO TEMP t",
            "LISTEN channel",
            "PREPARE p AS SELECT 1",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            "SELECT pg_advisory_lock(1)",
            "SELECT pg_advisory_unlock(1)",
            "SELECT set_config('a.b', 'c', false)",
            "DISCARD TEMP",
            "SET a.b = 1; LISTEN c",
            "this is not sql",
        ] {
            assert_eq!(effect(sql), SessionEffect::SessionState, "{sql}");
        }
        // Settings among several statements are read back afterwards.
        let settings = |keys: &[&str], write| SessionEffect::Settings {
            keys: keys.iter().map(|k| (*k).into()).collect(),
            write,
        };
        assert_eq!(effect("SET a.b = 1; SELECT 1"), settings(&["a.b"], true));
        assert_eq!(
            effect("BEGIN READ ONLY; SET application_name = 'x'; SET TIME ZONE 'UTC'; COMMIT"),
            settings(&["application_name", "timezone"], false)
        );
        assert_eq!(
            router.route("BEGIN READ ONLY; SET application_name = 'x'; COMMIT"),
            Target::Standby
        );
        assert_eq!(
            effect("BEGIN READ ONLY; SELECT 1; COMMIT"),
            SessionEffect::Read
        );
        assert_eq!(
            effect("BEGIN READ ONLY; CREATE TEMP TABLE t (a int)"),
            SessionEffect::SessionState
        );
        // Unlocking runs where the lock is, never on a standby.
        assert_eq!(
            router.route("SELECT pg_advisory_unlock(1)"),
            Target::Primary
        );
    }
}
