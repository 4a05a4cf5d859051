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
    decisions: Mutex<HashMap<Box<str>, Target>>,
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
        if sql.len() > CACHED_STATEMENT_BYTES {
            return self.decide(sql);
        }
        if let Some(target) = self.lock_decisions().get(sql) {
            return *target;
        }
        let target = self.decide(sql);
        let mut decisions = self.lock_decisions();
        if decisions.len() >= CACHED_DECISIONS {
            decisions.clear();
        }
        decisions.insert(sql.into(), target);
        target
    }

    fn lock_decisions(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Target>> {
        // A map of plain values cannot be left inconsistent by a panic.
        self.decisions
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Parses `sql` and decides.
    fn decide(&self, sql: &str) -> Target {
        let Ok(statements) = Parser::parse_sql(&PostgreSqlDialect {}, sql) else {
            return Target::Primary;
        };
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
        match statements.visit(&mut check) {
            ControlFlow::Continue(()) => Target::Standby,
            ControlFlow::Break(()) => Target::Primary,
        }
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
        // asked again).
        router
            .lock_decisions()
            .insert("SELECT 1".into(), Target::Primary);
        assert_eq!(router.route("SELECT 1"), Target::Primary);
        for i in 0..CACHED_DECISIONS + 10 {
            router.route(&format!("SELECT {i}"));
        }
        assert!(router.lock_decisions().len() <= CACHED_DECISIONS);
        let long = format!("SELECT '{}'", "x".repeat(CACHED_STATEMENT_BYTES));
        assert_eq!(router.route(&long), Target::Standby);
        assert!(!router.lock_decisions().contains_key(long.as_str()));
    }
}
