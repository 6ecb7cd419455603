//! The static guard: what a patch statement may be, decided on its syntax tree (sqlparser,
//! PostgreSQL dialect) before anything touches a database. Everything is an allow-list: one
//! `UPDATE` or `DELETE` of one table, expressions built from columns of that table, literals,
//! pure built-in operators and functions. What passes is rendered back from the tree, so the
//! statement that runs is exactly the one that was checked (comments and all else are gone).

use sqlparser::{
    ast::{
        Assignment, AssignmentTarget, BinaryOperator, DataType, Delete, Expr, FromTable, Function,
        FunctionArg, FunctionArgExpr, FunctionArguments, Ident, InTarget, ObjectName,
        ObjectNamePart, Statement, TableFactor, TableWithJoins, UnaryOperator, Update, Value,
    },
    dialect::PostgreSqlDialect,
    keywords::Keyword,
    parser::Parser,
    tokenizer::{Token, Tokenizer, Whitespace},
};
use std::fmt::Write;

/// Longest statement accepted (bytes).
pub const MAX_SQL_LEN: usize = 64 * 1024;

/// Most operators (`+`, `=`, `::`, `AND`, ...) one statement may hold: the parser makes a
/// chain of them a tree as deep as the chain is long, and checking, printing or dropping a
/// tree thousands deep overflows a thread's stack (the API's: the whole process aborted).
pub const MAX_OPERATORS: usize = 256;

/// Deepest nesting of parentheses (calls, groups, lists): the parser recurses once or more a
/// level, and 25 levels of `encode(...::bytea, 'hex')` overflowed a 2 MiB stack.
pub const MAX_NESTING: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    Update,
    Delete,
}

/// A statement that passed the guard, in pieces the batched execution reassembles.
#[derive(Clone, Debug)]
pub struct Checked {
    pub operation: Operation,
    /// The table as written (e.g. `public."Orders"`), for the catalog to resolve.
    pub table: String,
    /// The schema it names, as PostgreSQL folds it; `None` for an unqualified name.
    pub schema: Option<String>,
    /// The alias as written, if any (`UPDATE t AS x`).
    pub alias: Option<String>,
    /// `col = expr, ...` (UPDATE only).
    pub set: String,
    /// Columns the statement assigns, as PostgreSQL names them (unquoted folded to lower case).
    pub assigned: Vec<String>,
    /// The WHERE condition; `None` when the statement has none.
    pub filter: Option<String>,
    /// Why the WHERE clause touches every row anyway (`WHERE 1=1`, `... OR true`).
    pub filter_is_constant: bool,
    /// Functions whose value changes between calls or transactions (`now()`): each batch
    /// sees its own.
    pub unstable: Vec<String>,
}

/// Pure built-in functions a patch may call (lower-case, unqualified or `pg_catalog.`).
const PURE_FUNCTIONS: &[&str] = &[
    "abs",
    "array_append",
    "array_cat",
    "array_length",
    "array_position",
    "array_prepend",
    "array_remove",
    "array_replace",
    "array_to_string",
    "btrim",
    "cardinality",
    "cbrt",
    "ceil",
    "ceiling",
    "char_length",
    "character_length",
    "chr",
    "coalesce",
    "concat",
    "concat_ws",
    "date_part",
    "date_trunc",
    "decode",
    "div",
    "encode",
    "exp",
    "floor",
    "format",
    "greatest",
    "initcap",
    "jsonb_build_array",
    "jsonb_build_object",
    "jsonb_set",
    "jsonb_insert",
    "jsonb_strip_nulls",
    "json_build_array",
    "json_build_object",
    "least",
    "left",
    "length",
    "ln",
    "log",
    "lower",
    "lpad",
    "ltrim",
    "make_date",
    "make_interval",
    "make_timestamp",
    "md5",
    "mod",
    "nullif",
    "octet_length",
    "overlay",
    "position",
    "power",
    "regexp_replace",
    "regexp_match",
    "repeat",
    "replace",
    "reverse",
    "right",
    "round",
    "rpad",
    "rtrim",
    "sha256",
    "sign",
    "split_part",
    "sqrt",
    "starts_with",
    "string_to_array",
    "strpos",
    "substr",
    "substring",
    "to_char",
    "to_date",
    "to_json",
    "to_jsonb",
    "to_number",
    "to_timestamp",
    "translate",
    "trim",
    "trunc",
    "upper",
    "width_bucket",
];

/// Side-effect free, but their value depends on the transaction: allowed, and reported.
const UNSTABLE_FUNCTIONS: &[&str] = &[
    "now",
    "current_timestamp",
    "current_date",
    "current_time",
    "localtimestamp",
    "localtime",
    "transaction_timestamp",
    "statement_timestamp",
];

/// Whether a token joins or applies to operands (each one a level of the syntax tree); names,
/// literals, commas and parentheses do not (the parser bounds how deep parentheses nest).
fn is_operator(token: &Token) -> bool {
    match token {
        Token::Word(word) => matches!(
            word.keyword,
            Keyword::AND
                | Keyword::OR
                | Keyword::NOT
                | Keyword::IS
                | Keyword::LIKE
                | Keyword::ILIKE
                | Keyword::SIMILAR
                | Keyword::BETWEEN
                | Keyword::COLLATE
                | Keyword::AT
        ),
        Token::EOF
        | Token::Number(..)
        | Token::Char(_)
        | Token::SingleQuotedString(_)
        | Token::DoubleQuotedString(_)
        | Token::DollarQuotedString(_)
        | Token::NationalStringLiteral(_)
        | Token::EscapedStringLiteral(_)
        | Token::UnicodeStringLiteral(_)
        | Token::HexStringLiteral(_)
        | Token::Comma
        | Token::Whitespace(_)
        | Token::LParen
        | Token::RParen
        | Token::Period
        | Token::SemiColon => false,
        _ => true,
    }
}

/// Functions whose result is as long as an argument says (`repeat('x', 1000000000)` takes a
/// GB of the server's memory, even for a plan alone when the arguments are constants): their
/// length must be a literal of at most [`MAX_GROWN_LENGTH`].
const GROWING_FUNCTIONS: [&str; 3] = ["repeat", "lpad", "rpad"];
const MAX_GROWN_LENGTH: u64 = 10_000;
/// Functions whose result may be many times their arguments: none of them may take another's
/// result (`repeat(repeat('x', 10000), 9999)` is a GB again), and `format`'s widths are
/// bounded as the lengths above.
const MULTIPLYING_FUNCTIONS: [&str; 8] = [
    "repeat",
    "lpad",
    "rpad",
    "replace",
    "regexp_replace",
    "overlay",
    "format",
    "array_to_string",
];

/// The text of a string literal argument.
pub(super) fn literal_text(arg: Option<&FunctionArg>) -> Option<&str> {
    let Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Value(v)))) = arg else {
        return None;
    };
    match &v.value {
        Value::SingleQuotedString(text) => Some(text),
        _ => None,
    }
}

/// Why a multiplying call may grow past [`MAX_GROWN_LENGTH`] from what it is given, if it may:
/// `repeat` multiplies its text (a column's value, or a 60 KB literal, by 10,000 is a GB of the
/// server's memory), so it takes a literal text whose length times the count is within the
/// bound; `replace` multiplies its subject by its replacement's length over the matched one's,
/// so both are literals and the replacement at most [`MAX_REPLACEMENT_GROWTH`] longer.
fn multiplies_past_bound(name: &str, args: &[FunctionArg], count: Option<u64>) -> Option<String> {
    match name {
        "repeat" => {
            let text = literal_text(args.first())?.chars().count() as u64;
            let times = count.unwrap_or(u64::MAX);
            (text.saturating_mul(times) > MAX_GROWN_LENGTH).then(|| {
                format!(
                    "repeat() of {text} characters {times} times passes {MAX_GROWN_LENGTH} \
                     characters"
                )
            })
        }
        "replace" => {
            let from = literal_text(args.get(1)).map(|t| t.chars().count());
            let to = literal_text(args.get(2)).map(|t| t.chars().count());
            match (from, to) {
                (Some(from), Some(to)) if to <= from + MAX_REPLACEMENT_GROWTH => None,
                _ => Some(format!(
                    "replace() needs literal texts, the replacement at most \
                     {MAX_REPLACEMENT_GROWTH} characters longer than what it replaces: each \
                     match multiplies the value"
                )),
            }
        }
        // A match may be empty (`''` matches at every character): what each adds is bounded,
        // and it copies none of what it matched (`\&`, `\1`).
        "regexp_replace" => {
            let to = literal_text(args.get(2));
            match to {
                Some(to) if to.chars().count() <= MAX_REPLACEMENT_GROWTH && !to.contains('\\') => {
                    None
                }
                _ => Some(format!(
                    "regexp_replace() needs a literal replacement of at most \
                     {MAX_REPLACEMENT_GROWTH} characters and no back-references: a pattern \
                     may match at every character"
                )),
            }
        }
        // The separator goes between every two elements (`string_to_array(note, NULL)` has
        // one a character), as the text for NULL elements goes in each.
        "array_to_string" => {
            let short = |arg: Option<&FunctionArg>| {
                literal_text(arg).is_some_and(|t| t.chars().count() <= MAX_REPLACEMENT_GROWTH)
            };
            (!short(args.get(1)) || (args.len() > 2 && !short(args.get(2)))).then(|| {
                format!(
                    "array_to_string() needs literal texts of at most {MAX_REPLACEMENT_GROWTH} \
                     characters: each goes between or in every element"
                )
            })
        }
        _ => None,
    }
}
const MAX_REPLACEMENT_GROWTH: usize = 100;
/// Most conversions a `format` string may have: each copies an argument whole
/// (`%1$s%1$s...` 13,000 times over a column is a GB).
const MAX_FORMAT_CONVERSIONS: usize = 32;

/// Whether `format`'s first argument is a literal whose widths (`%10s`) are at most
/// [`MAX_GROWN_LENGTH`], none taken from an argument (`%*s`).
fn format_widths_bounded(first: Option<&FunctionArg>) -> bool {
    let Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Value(v)))) = first else {
        return false;
    };
    let Value::SingleQuotedString(text) = &v.value else {
        return false;
    };
    let specs = format_specs(text);
    specs.len() <= MAX_FORMAT_CONVERSIONS
        && specs.iter().all(|spec| {
            if spec.starts_with('*') {
                return false;
            }
            format_width(spec).is_none_or(|n| n <= MAX_GROWN_LENGTH)
        })
}

/// Each conversion of a `format` string, `%[position$][-][width]type`, from its width on.
/// `%%` is a percent sign, no conversion.
pub(super) fn format_specs(text: &str) -> Vec<String> {
    text.replace("%%", "")
        .split('%')
        .skip(1)
        .map(|spec| {
            let spec = match spec.find('$') {
                Some(at) if spec[..at].bytes().all(|b| b.is_ascii_digit()) => &spec[at + 1..],
                _ => spec,
            };
            spec.trim_start_matches('-').to_owned()
        })
        .collect()
}

/// The width a conversion's spec begins with, if any (`u64::MAX`: too long to read).
pub(super) fn format_width(spec: &str) -> Option<u64> {
    let width: String = spec.chars().take_while(char::is_ascii_digit).collect();
    (!width.is_empty()).then(|| width.parse().unwrap_or(u64::MAX))
}

/// Types a patch may not cast to or write literals of: catalog references and row and
/// transaction internals (`::regclass` names any relation from its number whatever the role
/// may read, another tenant's included). The tenant's own types (enums, domains) and the
/// ordinary ones pass.
const CATALOG_TYPES: &[&str] = &[
    "oid",
    "tid",
    "xid",
    "xid8",
    "cid",
    "regclass",
    "regtype",
    "regproc",
    "regprocedure",
    "regoper",
    "regoperator",
    "regnamespace",
    "regrole",
    "regconfig",
    "regdictionary",
    "regcollation",
    "aclitem",
    "refcursor",
];

/// Whether a cast's or typed literal's type is not a catalog one (nor an array of one).
fn cast_allowed(data_type: &DataType) -> Result<(), String> {
    let text = data_type.to_string().to_ascii_lowercase();
    // `pg_catalog."regclass"[]` is `regclass`: the schema, quotes, arguments and array
    // brackets do not change the kind.
    let mut base = String::with_capacity(text.len());
    let mut depth = 0usize;
    for c in text.chars() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => depth = depth.saturating_sub(1),
            '"' => {}
            c if depth == 0 => base.push(c),
            _ => {}
        }
    }
    let (schema, name) = match base.rsplit_once('.') {
        Some((schema, name)) => (Some(schema.trim()), name.trim()),
        None => (None, base.trim()),
    };
    // `_regclass` is `regclass[]` by its catalog name: its elements print as names too.
    let name = name.trim_start_matches('_');
    if CATALOG_TYPES.contains(&name) || name.starts_with("pg_") {
        Err(format!(
            "casts to {text}, a catalog type: it names objects the tenant's role cannot read"
        ))
    } else if schema.is_some_and(|schema| schema != "pg_catalog") {
        // A row type of another schema's table shows that table's columns.
        Err(format!(
            "casts to {text}, a type of another schema: name the tenant's own types unqualified"
        ))
    } else {
        Ok(())
    }
}

/// Checks `sql` and takes it apart. The error is the reason, for `payload.sql`.
pub fn check(sql: &str) -> Result<Checked, String> {
    if sql.trim().is_empty() {
        return Err("is empty: give one UPDATE or DELETE statement".into());
    }
    if sql.len() > MAX_SQL_LEN {
        return Err(format!("is longer than {MAX_SQL_LEN} bytes"));
    }
    let dialect = PostgreSqlDialect {};
    // Comments are refused outright: they can hide a second statement or the end of a WHERE
    // clause (`WHERE 1=1 -- AND id = 7`) from the person reviewing the patch.
    let tokens = Tokenizer::new(&dialect, sql)
        .tokenize()
        .map_err(|e| format!("is not valid SQL: {e}"))?;
    if tokens.iter().any(|t| {
        matches!(
            t,
            Token::Whitespace(Whitespace::SingleLineComment { .. })
                | Token::Whitespace(Whitespace::MultiLineComment(_))
        )
    }) {
        return Err(
            "contains a comment; comments are refused because they can hide a second \
                    statement or part of the WHERE clause"
                .into(),
        );
    }
    let depth = tokens
        .iter()
        .scan(0i64, |depth, t| {
            *depth += match t {
                Token::LParen | Token::LBracket => 1,
                Token::RParen | Token::RBracket => -1,
                _ => 0,
            };
            Some(*depth)
        })
        .max()
        .unwrap_or(0);
    if depth > MAX_NESTING as i64 {
        return Err(format!(
            "nests parentheses {depth} deep; at most {MAX_NESTING}"
        ));
    }
    let operators = tokens.iter().filter(|t| is_operator(t)).count();
    if operators > MAX_OPERATORS {
        return Err(format!(
            "holds {operators} operators; at most {MAX_OPERATORS} (a list of values is one \
             `IN (...)`)"
        ));
    }
    let statements =
        Parser::parse_sql(&dialect, sql).map_err(|e| format!("is not valid SQL: {e}"))?;
    let statement = match statements.as_slice() {
        [one] => one,
        [] => return Err("holds no statement: give one UPDATE or DELETE".into()),
        many => {
            return Err(format!(
                "holds {} statements; exactly one UPDATE or DELETE is allowed",
                many.len()
            ))
        }
    };
    let checked = match statement {
        Statement::Update(update) => check_update(update),
        Statement::Delete(delete) => check_delete(delete),
        other => Err(format!(
            "is {}; only one UPDATE or DELETE is allowed (no DDL, COPY, SELECT or other \
             statements)",
            describe(other)
        )),
    }?;
    renders_faithfully(statement, &checked)?;
    Ok(checked)
}

/// What runs is rendered from the tree, so the rendering must read back as the same tree, as
/// the jobs assemble it (`SET {set}`, `WHERE ({filter})`). sqlparser writes some input in a
/// form that reads differently; both were found by scripts/fuzz: a quote after a backslash in
/// a string is not doubled (`'\'''` came out as `'\''`, and PostgreSQL would have read what
/// follows as SQL), and a column named `select`, once in parentheses, starts a subquery.
fn renders_faithfully(statement: &Statement, checked: &Checked) -> Result<(), String> {
    let refusal = || {
        "cannot be rendered back exactly as written: quote identifiers that are keywords \
         (\"select\") and do not put a backslash before a quote in a string literal"
            .to_owned()
    };
    let (assignments, selection) = match statement {
        Statement::Update(u) => (u.assignments.as_slice(), &u.selection),
        Statement::Delete(d) => (&[][..], &d.selection),
        _ => return Err(refusal()),
    };
    let parse = |sql: &str| Parser::parse_sql(&PostgreSqlDialect {}, sql).map_err(|_| refusal());
    if !matches!(parse(&statement.to_string())?.as_slice(), [again] if again == statement) {
        return Err(refusal());
    }
    let set = if assignments.is_empty() {
        "conveyor = 1"
    } else {
        &checked.set
    };
    let filter = checked
        .filter
        .as_ref()
        .map(|f| format!(" WHERE ({f})"))
        .unwrap_or_default();
    let assembled = parse(&format!("UPDATE conveyor SET {set}{filter}"))?;
    let [Statement::Update(again)] = assembled.as_slice() else {
        return Err(refusal());
    };
    let same_set = assignments.is_empty() || again.assignments == assignments;
    let same_filter = match (selection, &again.selection) {
        (Some(original), Some(Expr::Nested(inner))) => **inner == *original,
        (None, None) => true,
        _ => false,
    };
    if same_set && same_filter {
        Ok(())
    } else {
        Err(refusal())
    }
}

/// The statement's first words, e.g. `DROP TABLE`, for a refusal.
fn describe(statement: &Statement) -> String {
    let text = statement.to_string();
    let words: Vec<&str> = text.split_whitespace().take(2).collect();
    let first = words.first().copied().unwrap_or("");
    match (first, words.get(1)) {
        ("CREATE" | "DROP" | "ALTER" | "TRUNCATE" | "GRANT" | "REVOKE", Some(second)) => {
            format!("DDL ({first} {second})")
        }
        _ => format!("a {first} statement"),
    }
}

fn check_update(update: &Update) -> Result<Checked, String> {
    let Update {
        table,
        assignments,
        from,
        selection,
        returning,
        output,
        or,
        order_by,
        limit,
        ..
    } = update;
    if from.is_some() {
        return Err(
            "UPDATE ... FROM reads other tables; a patch changes one table from its \
                    own columns only"
                .into(),
        );
    }
    if returning.is_some() || output.is_some() {
        return Err("RETURNING is not supported: the job reports the rows it changed".into());
    }
    if or.is_some() || !order_by.is_empty() || limit.is_some() {
        return Err("OR/ORDER BY/LIMIT are not PostgreSQL UPDATE syntax".into());
    }
    let (name, alias) = single_table(table)?;
    let scope = Scope::new(&name, alias.as_ref());
    let mut found = Found::default();
    let mut assigned = Vec::new();
    let mut set = Vec::new();
    for Assignment { target, value } in assignments {
        match target {
            AssignmentTarget::ColumnName(column) => assigned.push(column_name(column)?),
            AssignmentTarget::Tuple(columns) => {
                for column in columns {
                    assigned.push(column_name(column)?);
                }
            }
        }
        scope.check(value, &mut found)?;
        found.sizes.push(super::growth::bound(value)?);
        set.push(format!("{target} = {value}"));
    }
    if assigned.is_empty() {
        return Err("assigns no column".into());
    }
    finish(
        Operation::Update,
        &name,
        alias,
        set.join(", "),
        assigned,
        selection,
        &scope,
        found,
    )
}

fn check_delete(delete: &Delete) -> Result<Checked, String> {
    let Delete {
        tables,
        from,
        using,
        selection,
        returning,
        output,
        order_by,
        limit,
        ..
    } = delete;
    if !tables.is_empty() || using.is_some() {
        return Err(
            "DELETE ... USING reads other tables; a patch deletes from one table by its own \
             columns only"
                .into(),
        );
    }
    if returning.is_some() || output.is_some() {
        return Err("RETURNING is not supported: the job reports the rows it deleted".into());
    }
    if !order_by.is_empty() || limit.is_some() {
        return Err("ORDER BY/LIMIT are not PostgreSQL DELETE syntax".into());
    }
    let (FromTable::WithFromKeyword(from) | FromTable::WithoutKeyword(from)) = from;
    let [table] = from.as_slice() else {
        return Err("DELETE must name exactly one table".into());
    };
    let (name, alias) = single_table(table)?;
    let scope = Scope::new(&name, alias.as_ref());
    finish(
        Operation::Delete,
        &name,
        alias,
        String::new(),
        Vec::new(),
        selection,
        &scope,
        Found::default(),
    )
}

#[allow(clippy::too_many_arguments)]
fn finish(
    operation: Operation,
    name: &ObjectName,
    alias: Option<Ident>,
    set: String,
    assigned: Vec<String>,
    selection: &Option<Expr>,
    scope: &Scope,
    mut found: Found,
) -> Result<Checked, String> {
    let mut filter_is_constant = false;
    if let Some(condition) = selection {
        let before = found.columns;
        scope.check(condition, &mut found)?;
        found.sizes.push(super::growth::bound(condition)?);
        filter_is_constant = found.columns == before || has_constant_branch(scope, condition);
    }
    super::growth::statement_constant(&found.sizes)?;
    let parts: Vec<String> = name
        .0
        .iter()
        .filter_map(|part| part.as_ident().map(fold))
        .collect();
    if parts.len() > 2 {
        return Err(format!(
            "table name {name} has too many parts: give table or schema.table"
        ));
    }
    Ok(Checked {
        operation,
        table: name.to_string(),
        schema: (parts.len() == 2).then(|| parts[0].clone()),
        alias: alias.map(|a| a.to_string()),
        set,
        assigned,
        filter: selection.as_ref().map(|c| c.to_string()),
        filter_is_constant,
        unstable: found.unstable,
    })
}

/// Whether some branch of an OR does not depend on the row (`id = 5 OR 1 = 1`): the
/// condition then matches every row, or the branch is dead code hiding a mistake.
fn has_constant_branch(scope: &Scope, condition: &Expr) -> bool {
    match condition {
        Expr::Nested(inner) => has_constant_branch(scope, inner),
        Expr::BinaryOp {
            left,
            op: BinaryOperator::Or,
            right,
        } => [left, right].iter().any(|side| {
            let mut found = Found::default();
            scope.check(side, &mut found).is_ok() && found.columns == 0
                || has_constant_branch(scope, side)
        }),
        _ => false,
    }
}

/// The one table of the statement and its alias; joins and table functions are refused.
fn single_table(table: &TableWithJoins) -> Result<(ObjectName, Option<Ident>), String> {
    if !table.joins.is_empty() {
        return Err("joins are not allowed: a patch changes one table".into());
    }
    match &table.relation {
        // Every part spelled out: a modifier the guard dropped (`ONLY`, `TABLESAMPLE`, hints)
        // would make the statement that runs differ from the one reviewed.
        TableFactor::Table {
            name,
            alias,
            args: None,
            with_hints,
            version: None,
            with_ordinality: false,
            partitions,
            json_path: None,
            sample: None,
            index_directives,
            inheritance: None,
        } if with_hints.is_empty() && partitions.is_empty() && index_directives.is_empty() => {
            if name
                .0
                .iter()
                .any(|part| !matches!(part, ObjectNamePart::Identifier(_)))
            {
                return Err(format!("table name {name} is not a plain name"));
            }
            if alias.as_ref().is_some_and(|a| !a.columns.is_empty()) {
                return Err("column aliases on the table are not supported".into());
            }
            Ok((name.clone(), alias.as_ref().map(|a| a.name.clone())))
        }
        other => Err(format!("{other} is not a plain table")),
    }
}

/// An assignment target: one column, unqualified.
fn column_name(name: &ObjectName) -> Result<String, String> {
    match name.0.as_slice() {
        [ObjectNamePart::Identifier(ident)] => Ok(fold(ident)),
        _ => Err(format!(
            "assignment target {name} must be a plain column name"
        )),
    }
}

/// PostgreSQL's name for an identifier: unquoted ones fold to lower case, ASCII letters only
/// (`É` stays `É`; Unicode's rules made `ÉID` the column `éid`, and a Kelvin sign a `k`).
pub fn fold(ident: &Ident) -> String {
    if ident.quote_style.is_some() {
        ident.value.clone()
    } else {
        ident.value.to_ascii_lowercase()
    }
}

/// Words PostgreSQL reads as values where the parser sees a bare name: not columns. Counted
/// as columns, `WHERE id = 5 OR current_role IS NOT NULL` passed as a filter on the rows, and
/// `SET n = DEFAULT` ran the column's default (a `nextval` a dry run cannot undo).
const KEYWORD_VALUES: [&str; 8] = [
    "current_catalog",
    "current_role",
    "current_schema",
    "current_user",
    "default",
    "session_user",
    "system_user",
    "user",
];

/// What a walk over expressions found.
#[derive(Default)]
struct Found {
    /// References to the table's columns.
    columns: usize,
    unstable: Vec<String>,
    /// The bounds of the assignments' values and the condition.
    sizes: Vec<super::growth::Size>,
}

/// The names an expression may use to qualify a column: the alias, or else the table's name.
struct Scope {
    qualifiers: Vec<Vec<String>>,
}

impl Scope {
    fn new(table: &ObjectName, alias: Option<&Ident>) -> Self {
        let parts: Vec<String> = table
            .0
            .iter()
            .filter_map(|p| p.as_ident().map(fold))
            .collect();
        let qualifiers = match alias {
            Some(alias) => vec![vec![fold(alias)]],
            // `t.col` and `schema.t.col` both name the table.
            None => (0..parts.len()).map(|i| parts[i..].to_vec()).collect(),
        };
        Self { qualifiers }
    }

    /// Checks an expression against the allow-list, counting column references.
    fn check(&self, expr: &Expr, found: &mut Found) -> Result<(), String> {
        match expr {
            Expr::Identifier(ident)
                if ident.quote_style.is_none()
                    && KEYWORD_VALUES.contains(&ident.value.to_ascii_lowercase().as_str()) =>
            {
                Err(format!(
                    "{} is not a column; it is not allowed in a patch",
                    ident.value
                ))
            }
            Expr::Identifier(_) => {
                found.columns += 1;
                Ok(())
            }
            Expr::CompoundIdentifier(parts) => {
                let (_, qualifier) = parts.split_last().expect("compound has parts");
                let qualifier: Vec<String> = qualifier.iter().map(fold).collect();
                if self.qualifiers.contains(&qualifier) {
                    found.columns += 1;
                    Ok(())
                } else {
                    Err(format!(
                        "{expr} refers to another table; a patch reads only its own table"
                    ))
                }
            }
            Expr::Value(value) => match &value.value {
                Value::Placeholder(p) => Err(format!(
                    "placeholder {p} has no value: write the literal into the statement"
                )),
                _ => Ok(()),
            },
            Expr::TypedString(typed) => cast_allowed(&typed.data_type),
            Expr::IsFalse(e)
            | Expr::IsNotFalse(e)
            | Expr::IsTrue(e)
            | Expr::IsNotTrue(e)
            | Expr::IsNull(e)
            | Expr::IsNotNull(e)
            | Expr::IsUnknown(e)
            | Expr::IsNotUnknown(e)
            | Expr::Nested(e)
            | Expr::Collate { expr: e, .. }
            | Expr::Extract { expr: e, .. }
            | Expr::Ceil { expr: e, .. }
            | Expr::Floor { expr: e, .. } => self.check(e, found),
            Expr::Cast {
                expr: e,
                format,
                data_type,
                ..
            } if format.is_none() => {
                cast_allowed(data_type)?;
                self.check(e, found)
            }
            Expr::IsDistinctFrom(a, b)
            | Expr::IsNotDistinctFrom(a, b)
            | Expr::AtTimeZone {
                timestamp: a,
                time_zone: b,
            }
            | Expr::Position { expr: a, r#in: b } => {
                self.all([a, b].into_iter().map(|e| &**e), found)
            }
            Expr::In {
                expr: e,
                target: InTarget::List(list),
                ..
            } => {
                self.check(e, found)?;
                self.all(list.iter(), found)
            }
            Expr::Between {
                expr, low, high, ..
            } => self.all([expr, low, high].into_iter().map(|e| &**e), found),
            Expr::BinaryOp { left, op, right } => {
                allowed_operator(op)?;
                self.all([left, right].into_iter().map(|e| &**e), found)
            }
            Expr::AnyOp {
                left,
                compare_op,
                right,
                ..
            }
            | Expr::AllOp {
                left,
                compare_op,
                right,
            } => {
                allowed_operator(compare_op)?;
                self.all([left, right].into_iter().map(|e| &**e), found)
            }
            Expr::Like {
                expr,
                pattern,
                escape_char,
                ..
            }
            | Expr::ILike {
                expr,
                pattern,
                escape_char,
                ..
            }
            | Expr::SimilarTo {
                expr,
                pattern,
                escape_char,
                ..
            } => self.all(
                [expr, pattern]
                    .into_iter()
                    .chain(escape_char.iter())
                    .map(|e| &**e),
                found,
            ),
            Expr::UnaryOp { op, expr } => match op {
                UnaryOperator::Plus
                | UnaryOperator::Minus
                | UnaryOperator::Not
                | UnaryOperator::BitwiseNot
                | UnaryOperator::PGAbs
                | UnaryOperator::PGSquareRoot
                | UnaryOperator::PGCubeRoot => self.check(expr, found),
                other => Err(format!("operator {other} is not allowed")),
            },
            Expr::Substring {
                expr,
                substring_from,
                substring_for,
                ..
            } => self.all(
                std::iter::once(expr)
                    .chain(substring_from.iter())
                    .chain(substring_for.iter())
                    .map(|e| &**e),
                found,
            ),
            Expr::Trim {
                expr,
                trim_what,
                trim_characters,
                ..
            } => {
                self.all(
                    std::iter::once(expr).chain(trim_what.iter()).map(|e| &**e),
                    found,
                )?;
                self.all(trim_characters.iter().flatten(), found)
            }
            Expr::Overlay {
                expr,
                overlay_what,
                overlay_from,
                overlay_for,
            } => self.all(
                [expr, overlay_what, overlay_from]
                    .into_iter()
                    .chain(overlay_for.iter())
                    .map(|e| &**e),
                found,
            ),
            Expr::Case {
                operand,
                conditions,
                else_result,
                ..
            } => {
                self.all(
                    operand.iter().chain(else_result.iter()).map(|e| &**e),
                    found,
                )?;
                self.all(
                    conditions.iter().flat_map(|c| [&c.condition, &c.result]),
                    found,
                )
            }
            Expr::Tuple(items) => self.all(items.iter(), found),
            Expr::Array(array) => self.all(array.elem.iter(), found),
            Expr::Interval(interval) => self.check(&interval.value, found),
            Expr::Function(function) => self.check_function(function, found),
            Expr::Subquery(_) | Expr::Exists { .. } | Expr::In { .. } => Err(format!(
                "subquery in {expr} is not allowed: a patch reads only its own table"
            )),
            other => Err(format!("expression {other} is not supported")),
        }
    }

    fn all<'e>(
        &self,
        exprs: impl IntoIterator<Item = &'e Expr>,
        found: &mut Found,
    ) -> Result<(), String> {
        exprs.into_iter().try_for_each(|e| self.check(e, found))
    }

    fn check_function(&self, function: &Function, found: &mut Found) -> Result<(), String> {
        let parts: Vec<String> = function
            .name
            .0
            .iter()
            .map(|p| p.as_ident().map(fold).unwrap_or_default())
            .collect();
        let name = match parts.as_slice() {
            [name] => name.as_str(),
            [schema, name] if schema == "pg_catalog" => name.as_str(),
            _ => "",
        };
        let unstable = UNSTABLE_FUNCTIONS.contains(&name);
        if !(PURE_FUNCTIONS.contains(&name) || unstable) {
            return Err(format!(
                "calls {}(), which is not on the allow-list of side-effect-free functions",
                function.name
            ));
        }
        if function.over.is_some() || !function.within_group.is_empty() {
            return Err(format!(
                "{}() as a window or aggregate is not allowed",
                function.name
            ));
        }
        if !matches!(function.parameters, FunctionArguments::None) {
            return Err(format!(
                "{}() with parameters is not allowed",
                function.name
            ));
        }
        if unstable {
            found.unstable.push(format!("{name}()"));
        }
        if let Some(filter) = &function.filter {
            self.check(filter, found)?;
        }
        match &function.args {
            FunctionArguments::None => Ok(()),
            FunctionArguments::Subquery(_) => Err(format!(
                "{}() over a subquery is not allowed: a patch reads only its own table",
                function.name
            )),
            FunctionArguments::List(list) => {
                if !list.clauses.is_empty() || list.duplicate_treatment.is_some() {
                    return Err(format!("{}() with clauses is not allowed", function.name));
                }
                if MULTIPLYING_FUNCTIONS.contains(&name) {
                    let nested = list.args.iter().any(|arg| {
                        let text = arg.to_string().to_ascii_lowercase();
                        MULTIPLYING_FUNCTIONS
                            .iter()
                            .any(|f| text.contains(&format!("{f}(")))
                    });
                    if nested {
                        return Err(format!(
                            "{}() takes the result of repeat, lpad, rpad, replace, \
                             regexp_replace, overlay, format or array_to_string: such results \
                             multiply",
                            function.name
                        ));
                    }
                }
                if name == "format" && !format_widths_bounded(list.args.first()) {
                    return Err(format!(
                        "{}() needs a literal format with widths of at most {MAX_GROWN_LENGTH} \
                         and at most {MAX_FORMAT_CONVERSIONS} conversions",
                        function.name
                    ));
                }
                if GROWING_FUNCTIONS.contains(&name) {
                    let length = list.args.get(1).and_then(|arg| match arg {
                        FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Value(v))) => {
                            match &v.value {
                                Value::Number(n, _) => n.parse::<u64>().ok(),
                                _ => None,
                            }
                        }
                        _ => None,
                    });
                    if length.is_none_or(|n| n > MAX_GROWN_LENGTH) {
                        return Err(format!(
                            "{}() needs a literal length of at most {MAX_GROWN_LENGTH}: a \
                             computed or larger one can take the database server's memory",
                            function.name
                        ));
                    }
                    if name == "repeat" && literal_text(list.args.first()).is_none() {
                        return Err(format!(
                            "{}() needs a literal text: a column's value repeated can take the \
                             database server's memory",
                            function.name
                        ));
                    }
                    if let Some(why) = multiplies_past_bound(name, &list.args, length) {
                        return Err(why);
                    }
                }
                if matches!(name, "replace" | "regexp_replace" | "array_to_string") {
                    if let Some(why) = multiplies_past_bound(name, &list.args, None) {
                        return Err(why);
                    }
                }
                list.args.iter().try_for_each(|arg| {
                    let (FunctionArg::Named { arg, .. }
                    | FunctionArg::ExprNamed { arg, .. }
                    | FunctionArg::Unnamed(arg)) = arg;
                    match arg {
                        FunctionArgExpr::Expr(e) => self.check(e, found),
                        _ => Err(format!("{}({arg}) is not allowed", function.name)),
                    }
                })
            }
        }
    }
}

/// Built-in operators with no side effects: arithmetic, comparison, logic, text, JSON.
fn allowed_operator(op: &BinaryOperator) -> Result<(), String> {
    use BinaryOperator::*;
    match op {
        Plus | Minus | Multiply | Divide | Modulo | StringConcat | Gt | Lt | GtEq | LtEq | Eq
        | NotEq | And | Or | BitwiseOr | BitwiseAnd | PGBitwiseXor | PGBitwiseShiftLeft
        | PGBitwiseShiftRight | PGExp | PGOverlap | PGRegexMatch | PGRegexIMatch
        | PGRegexNotMatch | PGRegexNotIMatch | PGLikeMatch | PGILikeMatch | PGNotLikeMatch
        | PGNotILikeMatch | PGStartsWith | Arrow | LongArrow | HashArrow | HashLongArrow
        | HashMinus | AtArrow | ArrowAt | Question | QuestionAnd | QuestionPipe => Ok(()),
        other => {
            let mut text = String::new();
            let _ = write!(text, "{other}");
            Err(format!(
                "operator {text} is not on the allow-list of built-in operators"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(sql: &str) -> String {
        check(sql).expect_err(sql)
    }

    #[test]
    fn a_plain_update_is_taken_apart() {
        let c = check("update Public.\"Orders\" as o set total = o.total * 2, note = lower(note) where o.id between 1 and 10;").unwrap();
        assert_eq!(c.operation, Operation::Update);
        assert_eq!(c.table, "Public.\"Orders\"");
        assert_eq!(c.alias.as_deref(), Some("o"));
        assert_eq!(c.assigned, ["total", "note"]);
        assert_eq!(c.set, "total = o.total * 2, note = lower(note)");
        assert_eq!(c.filter.as_deref(), Some("o.id BETWEEN 1 AND 10"));
        assert!(!c.filter_is_constant);
        assert!(c.unstable.is_empty());
    }

    /// Bare keywords that are values, not columns, are refused; unquoted names fold ASCII
    /// letters only, as PostgreSQL folds them.
    #[test]
    fn keyword_values_are_not_columns_and_names_fold_as_postgres_folds_them() {
        for (sql, word) in [
            (
                "DELETE FROM t WHERE id = 5 OR current_role IS NOT NULL",
                "current_role",
            ),
            (
                "DELETE FROM t WHERE current_schema IS NOT NULL",
                "current_schema",
            ),
            (
                "UPDATE t SET note = system_user WHERE id = 1",
                "system_user",
            ),
            ("UPDATE t SET n = DEFAULT WHERE id = 1", "DEFAULT"),
        ] {
            let why = refused(sql);
            assert_eq!(
                why,
                format!("{word} is not a column; it is not allowed in a patch")
            );
        }
        // A quoted name is a column of that name.
        assert!(check("UPDATE t SET \"user\" = 'x' WHERE id = 1").is_ok());
        let c = check("UPDATE t SET ÉID = 1, Note = 2 WHERE a = 1").unwrap();
        assert_eq!(c.assigned, ["Éid", "note"]);
        let why = refused("UPDATE t SET d = ma\u{212A}e_date(2020, 1, 1) WHERE id = 1");
        assert!(why.contains("allow-list"), "{why}");
    }

    #[test]
    fn a_delete_and_unstable_functions() {
        let c = check("DELETE FROM events WHERE created_at < now() - interval '30 days'").unwrap();
        assert_eq!(c.operation, Operation::Delete);
        assert_eq!(c.table, "events");
        assert_eq!(c.unstable, ["now()"]);
        let c = check("UPDATE t SET a = 1").unwrap();
        assert!(c.filter.is_none());
    }

    /// A chain of 32,000 additions inside the length cap made a tree 32,000 deep, whose check
    /// overflowed the stack of the thread (an API worker's 2 MiB): refused before parsing. A
    /// long list of values is no chain.
    #[test]
    fn a_chain_of_operators_past_the_bound_is_refused_on_a_small_stack() {
        let chain = format!("UPDATE t SET a = 1{} WHERE id = 1", "+1".repeat(32_000));
        assert!(chain.len() < MAX_SQL_LEN);
        let list: Vec<String> = (0..5_000).map(|i| i.to_string()).collect();
        let listed = format!("DELETE FROM t WHERE id IN ({})", list.join(", "));
        let checked = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || (check(&chain).map(drop), check(&listed).map(drop)))
            .unwrap()
            .join()
            .expect("the check returns");
        let error = checked.0.unwrap_err();
        assert!(error.contains("32002 operators; at most 256"), "{error}");
        assert_eq!(checked.1, Ok(()));
        // Calls nested past the parser's stack, the same.
        let mut nested = "note".to_owned();
        for _ in 0..40 {
            nested = format!("lower({nested}::text)");
        }
        let nested = format!("UPDATE t SET note = {nested} WHERE id = 1");
        let refused = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || check(&nested).map(drop))
            .unwrap()
            .join()
            .expect("the check returns");
        assert_eq!(
            refused,
            Err("nests parentheses 40 deep; at most 16".to_owned())
        );
        let ands = (0..100).map(|i| format!("a <> {i}")).collect::<Vec<_>>();
        assert!(check(&format!("DELETE FROM t WHERE {}", ands.join(" AND "))).is_ok());
    }

    /// Casts and typed literals of catalog types would name other tenants' tables and roles;
    /// value types and the tenant's own (an enum) pass, with arguments and as arrays.
    #[test]
    fn casts_never_to_catalog_types() {
        for sql in [
            "UPDATE items SET note = ((id + 16383)::oid)::regclass::text WHERE id = 1",
            "UPDATE items SET note = CAST(id AS regnamespace)::text WHERE id = 1",
            "UPDATE items SET note = regclass 'orders' WHERE id = 1",
            "UPDATE items SET note = 'x'::pg_catalog.regrole WHERE id = 1",
            "UPDATE items SET note = 'x'::\"regclass\"[] WHERE id = 1",
            "UPDATE items SET note = ('{1259}'::_regclass)::text WHERE id = 1",
            "UPDATE items SET note = ('{2200}'::pg_catalog._regnamespace)::text WHERE id = 1",
            "UPDATE items SET note = ('{10}'::\"_regrole\")::text WHERE id = 1",
            "UPDATE items SET note = CAST('{1}' AS _pg_lsn)::text WHERE id = 1",
            "DELETE FROM items WHERE id::tid IS NULL",
            "DELETE FROM items WHERE note::pg_lsn IS NULL",
        ] {
            assert!(refused(sql).contains("a catalog type"), "{sql}");
        }
        for sql in [
            "UPDATE items SET total = total::numeric(10, 2) WHERE id = 1",
            "UPDATE items SET due = '2024-01-01'::date + interval '1 day' WHERE id = 1",
            "UPDATE items SET tags = '{a}'::text[] WHERE id = 1",
            "UPDATE items SET at = TIMESTAMP '2024-01-01 00:00' WHERE id::bigint = 1",
            "UPDATE items SET at = now()::timestamp with time zone WHERE id = 1",
            "UPDATE orders SET status = 'shipped'::order_status WHERE id = 1",
            "UPDATE hosts SET addr = '10.0.0.1'::inet WHERE id = 1",
            "UPDATE items SET n = n::pg_catalog.int4 WHERE id = 1",
        ] {
            check(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
        // Another schema's type: a table's row type shows that table's columns.
        let why = refused(
            "UPDATE items SET note = (NULL::conveyor_snapshots.patch_x)::text WHERE id = 1",
        );
        assert!(why.contains("a type of another schema"), "{why}");
    }

    #[test]
    fn functions_that_grow_take_a_small_literal_length() {
        for sql in [
            "UPDATE t SET note = repeat('x', 1000000000) WHERE id = 1",
            "UPDATE t SET note = lpad(note, id * 1000000) WHERE id = 1",
            "UPDATE t SET note = rpad(note) WHERE id = 1",
        ] {
            assert!(
                refused(sql).contains("literal length of at most 10000"),
                "{sql}"
            );
        }
        check("UPDATE t SET code = lpad(code, 5, '0'), bar = repeat('-', 80) WHERE id = 1")
            .unwrap();
        // Nested, they multiply; format's widths are lengths too.
        for sql in [
            "UPDATE t SET note = repeat(repeat('xxxxxxxxxx', 10000), 9999) WHERE id = 1",
            "UPDATE t SET note = replace(repeat('x', 10000), 'x', repeat('x', 10000)) WHERE id = 1",
            "UPDATE t SET note = format('%999999999s', '') WHERE id = 1",
            "UPDATE t SET note = format('%*s', 1000000000, '') WHERE id = 1",
            "UPDATE t SET note = format(note, 1) WHERE id = 1",
        ] {
            assert!(check(sql).is_err(), "{sql}");
        }
        check("UPDATE t SET note = format('order 123456: %s-%05s', code, id) WHERE id = 1")
            .unwrap();
        check("UPDATE t SET s = replace(note, 'a', 'b') WHERE id = 1").unwrap();
        check("UPDATE t SET s = replace(email, '@old.example', '@new.example.org') WHERE id = 1")
            .unwrap();
        check("UPDATE t SET bar = repeat('ab', 5000) WHERE id = 1").unwrap();
    }

    /// `replace`'s bound held for `replace` alone: `regexp_replace` (whose pattern may match
    /// at every character), a `format` of thousands of conversions and `array_to_string`'s
    /// separator between every character each grew a value to a GB of the server's memory,
    /// on the default target all tenants share (constant arguments even while planning).
    #[test]
    fn regexp_replace_format_and_array_to_string_are_bounded_too() {
        let long = "y".repeat(60_000);
        let conversions = "%1$s".repeat(13_000);
        for sql in [
            "UPDATE t SET note = regexp_replace(repeat('x', 10000), 'x', repeat('y', 10000), 'g') \
             WHERE id = 1"
                .to_owned(),
            format!("UPDATE t SET note = regexp_replace(note, '', '{long}', 'g') WHERE id = 1"),
            "UPDATE t SET note = regexp_replace(note, '(.)', '\\1\\1', 'g') WHERE id = 1"
                .to_owned(),
            "UPDATE t SET note = regexp_replace(note, 'a', code, 'g') WHERE id = 1".to_owned(),
            format!("UPDATE t SET note = format('{conversions}', note) WHERE id = 1"),
            format!(
                "UPDATE t SET note = array_to_string(string_to_array(note, NULL), '{long}') \
                 WHERE id = 1"
            ),
            "UPDATE t SET note = array_to_string(tags, code) WHERE id = 1".to_owned(),
        ] {
            assert!(check(&sql).is_err(), "{}", &sql[..sql.len().min(120)]);
        }
        check(
            "UPDATE t SET email = regexp_replace(email, '@.*$', '@new.example.org') WHERE id = 1",
        )
        .unwrap();
        check("UPDATE t SET note = array_to_string(tags, ', ', '-') WHERE id = 1").unwrap();
        check("UPDATE t SET note = format('%s: %s (100%%)', code, note) WHERE id = 1").unwrap();
    }

    /// The growth bound held for the count alone: a 5,000-character literal repeated 10,000
    /// times (50 MB; 64 KB of literal, 640 MB) passed, as did a column's value repeated or a
    /// replacement that multiplies every match.
    #[test]
    fn what_repeat_and_replace_multiply_is_bounded_too() {
        let long = "x".repeat(5_000);
        for (sql, why) in [
            (
                format!("UPDATE t SET note = repeat('{long}', 10000) WHERE id = 1"),
                "repeat() of 5000 characters 10000 times passes 10000 characters",
            ),
            (
                "UPDATE t SET note = repeat(note, 1000) WHERE id = 1".to_owned(),
                "repeat() needs a literal text",
            ),
            (
                format!("UPDATE t SET note = replace(note, 'a', '{long}') WHERE id = 1"),
                "replace() needs literal texts",
            ),
            (
                "UPDATE t SET note = replace(note, 'a', note) WHERE id = 1".to_owned(),
                "replace() needs literal texts",
            ),
        ] {
            assert!(refused(&sql).contains(why), "{sql}: {}", refused(&sql));
        }
    }

    #[test]
    fn more_than_one_statement_is_refused() {
        assert!(refused("UPDATE t SET a=1; DROP TABLE t").contains("2 statements"));
        assert!(
            refused("UPDATE t SET a=1 WHERE id=1; UPDATE t SET a=2 WHERE id=2")
                .contains("statements")
        );
    }

    #[test]
    fn comments_are_refused() {
        for sql in [
            "UPDATE t SET a=1 WHERE 1=1 -- AND id = 5",
            "UPDATE t SET a=1 WHERE id = 5 /* ; DROP TABLE t */",
            "/* harmless? */ DELETE FROM t WHERE id = 5",
            "UPDATE t SET a=1 WHERE id=1 --\n; DROP TABLE t",
        ] {
            assert!(refused(sql).contains("comment"), "{sql}");
        }
    }

    #[test]
    fn other_statements_are_refused() {
        assert!(refused("DROP TABLE t").contains("DDL (DROP TABLE)"));
        assert!(refused("TRUNCATE t").contains("DDL"));
        assert!(refused("ALTER TABLE t ADD COLUMN b int").contains("DDL"));
        assert!(refused("COPY t FROM '/etc/passwd'").contains("COPY"));
        assert!(refused("SELECT * FROM t").contains("SELECT"));
        assert!(refused("INSERT INTO t VALUES (1)").contains("INSERT"));
        assert!(refused("WITH x AS (SELECT 1) UPDATE t SET a = 1").contains("only one UPDATE"));
    }

    #[test]
    fn other_tables_are_refused() {
        assert!(refused("UPDATE t SET a = u.a FROM u WHERE u.id = t.id").contains("FROM"));
        assert!(refused("DELETE FROM t USING u WHERE u.id = t.id").contains("USING"));
        assert!(refused("UPDATE t SET a = (SELECT max(a) FROM u)").contains("subquery"));
        assert!(refused("DELETE FROM t WHERE id IN (SELECT id FROM u)").contains("subquery"));
        assert!(refused("DELETE FROM t WHERE EXISTS (SELECT 1 FROM u)").contains("subquery"));
        assert!(refused("UPDATE t SET a = u.a WHERE id = 1").contains("another table"));
        assert!(refused("UPDATE t AS x SET a = t.a WHERE x.id = 1").contains("another table"));
        assert!(refused("DELETE FROM t, u WHERE t.id = 1").contains("exactly one table"));
        assert!(refused("UPDATE t SET a = 1 WHERE id = 1 RETURNING *").contains("RETURNING"));
        // Found by scripts/fuzz: ONLY was accepted and dropped, so the patch reached the
        // table's inheritance children that the reviewed statement excluded.
        assert!(refused("UPDATE ONLY t SET a = 1 WHERE id = 1").contains("not a plain table"));
        assert!(refused("DELETE FROM ONLY t WHERE id = 1").contains("not a plain table"));
        // Found by scripts/fuzz: `'\'''` (the text \') was rendered as `'\''`.
        assert!(refused(r"UPDATE t SET a = '\''' WHERE id = 1").contains("rendered back"));
        // Found by scripts/fuzz: `WHERE (select COLLATE "C")` is a subquery.
        assert!(refused(r#"DELETE FROM t WHERE select COLLATE "C""#).contains("rendered back"));
    }

    #[test]
    fn side_effects_are_refused() {
        for sql in [
            "UPDATE t SET a = nextval('s') WHERE id = 1",
            "UPDATE t SET a = 1 WHERE pg_sleep(10) IS NULL",
            "DELETE FROM t WHERE id = pg_terminate_backend(42)",
            "UPDATE t SET a = set_config('role', 'x', false) WHERE id = 1",
            "UPDATE t SET a = my_schema.lower(a) WHERE id = 1",
            "UPDATE t SET a = random() WHERE id = 1",
            "UPDATE t SET a = lo_import('/etc/passwd') WHERE id = 1",
        ] {
            assert!(refused(sql).contains("allow-list"), "{sql}");
        }
        assert!(refused("UPDATE t SET a = $1 WHERE id = 1").contains("placeholder"));
        assert!(
            refused("UPDATE t SET a = a OPERATOR(public.+) 1 WHERE id = 1").contains("operator")
        );
    }

    #[test]
    fn constant_conditions_are_flagged() {
        for sql in [
            "UPDATE t SET a = 1 WHERE 1=1",
            "UPDATE t SET a = 1 WHERE true",
            "DELETE FROM t WHERE id = 5 OR 1 = 1",
            "DELETE FROM t WHERE (id = 5 OR (2 > 1))",
        ] {
            assert!(check(sql).unwrap().filter_is_constant, "{sql}");
        }
        assert!(
            !check("DELETE FROM t WHERE id = 5 OR a = 2")
                .unwrap()
                .filter_is_constant
        );
        assert!(
            !check("DELETE FROM t WHERE id = 5 AND 1 = 1")
                .unwrap()
                .filter_is_constant
        );
    }

    #[test]
    fn garbage_is_refused() {
        assert!(refused("").contains("empty"));
        assert!(refused("UPDATE t SET").contains("not valid SQL"));
        assert!(refused("UPDATE t SET a = 'unterminated").contains("not valid SQL"));
    }
}
