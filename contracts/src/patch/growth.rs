//! How large a patch's expressions can grow, bounded from the syntax tree: PostgreSQL computes
//! each one per row on the target every tenant shares, and folds one of constants while it
//! plans, so the preflight's `EXPLAIN` alone computes `encode(encode(...'aaaa'::bytea...))`.
//! Every expression's size is bounded by `values` times the longest value a row holds plus
//! `constant` bytes, from what each operator and function can make of its arguments' sizes;
//! a statement in which any bound passes [`MAX_VALUES`] or [`MAX_CONSTANT`] is refused. The
//! bounds are generous: they stop what multiplies, not what a patch writes.

use super::guard::{fold, format_specs, format_width, literal_text};
use sqlparser::ast::{
    BinaryOperator, Expr, Function, FunctionArg, FunctionArgExpr, FunctionArguments, InTarget,
    Value,
};

/// Most times a row's longest value one expression may hold (`a || b || c` is three).
pub const MAX_VALUES: u64 = 256;
/// Most bytes an expression of literals alone may make (the planner computes it).
pub const MAX_CONSTANT: u64 = 1 << 20;

/// A bound on an expression's size: `values` times a row's longest value, plus `constant`
/// bytes. `u64::MAX` values: a product of two row values, unbounded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Size {
    pub values: u64,
    pub constant: u64,
}

impl Size {
    const SMALL: Size = Size {
        values: 0,
        constant: 64,
    };

    fn constant(bytes: usize) -> Size {
        Size {
            values: 0,
            constant: bytes as u64,
        }
    }

    fn plus(self, other: Size) -> Size {
        Size {
            values: self.values.saturating_add(other.values),
            constant: self.constant.saturating_add(other.constant),
        }
    }

    fn times(self, factor: u64) -> Size {
        Size {
            values: self.values.saturating_mul(factor),
            constant: self.constant.saturating_mul(factor),
        }
    }

    fn max(self, other: Size) -> Size {
        Size {
            values: self.values.max(other.values),
            constant: self.constant.max(other.constant),
        }
    }

    /// Each byte of `self` may become `each` plus itself (a replacement, a separator).
    fn each_becoming(self, each: Size) -> Size {
        if self.values > 0 && each.values > 0 {
            return Size {
                values: u64::MAX,
                constant: 0,
            };
        }
        let factor = each.constant.saturating_add(1);
        Size {
            values: self
                .values
                .saturating_mul(factor)
                .saturating_add(self.constant.saturating_mul(each.values)),
            constant: self.constant.saturating_mul(factor),
        }
    }
}

/// The bound of `expr`'s size, or why it is refused: some part of it may grow past the
/// bounds. `expr` has passed the guard's allow-list.
pub fn bound(expr: &Expr) -> Result<Size, String> {
    let size = size_of(expr)?;
    if size.values > MAX_VALUES {
        let times = if size.values == u64::MAX {
            "a row's value times another's".to_owned()
        } else {
            format!("{} times a row's longest value", size.values)
        };
        return Err(format!(
            "may make a value of {times} ({expr}); at most {MAX_VALUES} times: such values \
             take the database server's memory"
        ));
    }
    if size.constant > MAX_CONSTANT {
        return Err(format!(
            "may make a value of {} bytes from literals ({expr}); at most {MAX_CONSTANT}: the \
             database computes it while it plans",
            size.constant
        ));
    }
    Ok(size)
}

fn all<'e>(exprs: impl IntoIterator<Item = &'e Expr>) -> Result<Vec<Size>, String> {
    exprs.into_iter().map(bound).collect()
}

fn sum(sizes: &[Size]) -> Size {
    sizes.iter().fold(Size::default(), |a, b| a.plus(*b))
}

/// Children bounded, a result of a few bytes (a boolean, a number, a date); the literal
/// bytes the children hold are the statement's still (see [`statement_constant`]).
fn small<'e>(exprs: impl IntoIterator<Item = &'e Expr>) -> Result<Size, String> {
    let held = sum(&all(exprs)?).constant;
    Ok(Size {
        values: 0,
        constant: Size::SMALL.constant.saturating_add(held),
    })
}

/// Checks the literal bytes of a whole statement, its assignments' and its condition's
/// bounds together, against [`MAX_CONSTANT`]: each is bounded alone, and a statement may
/// hold thousands (an `IN` list of long typed literals, a column each).
pub fn statement_constant(bounds: &[Size]) -> Result<(), String> {
    let total = sum(bounds).constant;
    if total > MAX_CONSTANT {
        return Err(format!(
            "may make {total} bytes from literals in all; at most {MAX_CONSTANT}: the \
             database computes them while it plans"
        ));
    }
    Ok(())
}

fn size_of(expr: &Expr) -> Result<Size, String> {
    Ok(match expr {
        Expr::Identifier(_) | Expr::CompoundIdentifier(_) => Size {
            values: 1,
            constant: 0,
        },
        // A number is as long as it prints: `1e131000` is 131,001 digits.
        Expr::Value(value) => {
            let text = value.to_string();
            Size::constant(text.len() + exponents(&text) * NUMERIC_TEXT)
        }
        Expr::TypedString(typed) => {
            let text = typed.to_string();
            let declared = type_length(&typed.data_type.to_string())?;
            let written = Size::constant(text.len() + exponents(&text) * NUMERIC_TEXT);
            if typed.data_type.to_string().contains('[') {
                written.each_becoming(Size::constant(declared))
            } else {
                written.plus(Size::constant(declared))
            }
        }
        Expr::Nested(e) | Expr::Collate { expr: e, .. } | Expr::UnaryOp { expr: e, .. } => {
            bound(e)?
        }
        // Of a number: as long as it. Of anything as text: `bytea` prints two characters a
        // byte (and `encode(x, 'hex')::bytea` reads each back as one).
        Expr::Ceil { expr: e, .. } | Expr::Floor { expr: e, .. } => bound(e)?,
        // A type's length pads to it (`0::bit(80000000)` is 80 MB of text).
        // Each element of an array may be padded so; text read as numbers may hold
        // exponents (`'[1e131000, ...]'::jsonb`), which a row's value may too.
        Expr::Cast {
            expr: e, data_type, ..
        } => {
            let input = bound(e)?;
            let target = data_type.to_string().to_ascii_lowercase();
            let declared = type_length(&target)?;
            let array = target.contains('[') || target.starts_with("array");
            let numeric = ["numeric", "decimal"].iter().any(|t| target.contains(t));
            let many_numbers = target.contains("json") || (numeric && array);
            if many_numbers && input.values > 0 {
                return Err(format!(
                    "casts a column's value to {target}, whose numbers' exponents may each \
                     print as 131,072 digits: cast a literal, or keep the value's type"
                ));
            }
            let printed = input.times(2).plus(Size::constant(2));
            match (array, numeric) {
                (true, _) => printed.each_becoming(Size::constant(declared)),
                // One number, as long as its declared precision, else a numeric's longest.
                (false, true) if declared == 0 => printed.plus(Size::constant(NUMERIC_TEXT)),
                _ => printed.plus(Size::constant(declared)),
            }
        }
        Expr::IsFalse(e)
        | Expr::IsNotFalse(e)
        | Expr::IsTrue(e)
        | Expr::IsNotTrue(e)
        | Expr::IsNull(e)
        | Expr::IsNotNull(e)
        | Expr::IsUnknown(e)
        | Expr::IsNotUnknown(e)
        | Expr::Extract { expr: e, .. } => small([&**e])?,
        Expr::IsDistinctFrom(a, b)
        | Expr::IsNotDistinctFrom(a, b)
        | Expr::AtTimeZone {
            timestamp: a,
            time_zone: b,
        }
        | Expr::Position { expr: a, r#in: b }
        | Expr::AnyOp {
            left: a, right: b, ..
        }
        | Expr::AllOp {
            left: a, right: b, ..
        } => small([&**a, &**b])?,
        Expr::In {
            expr,
            target: InTarget::List(list),
            ..
        } => small(std::iter::once(&**expr).chain(list))?,
        Expr::Between {
            expr, low, high, ..
        } => small([&**expr, &**low, &**high])?,
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
        } => small(
            [&**expr, &**pattern]
                .into_iter()
                .chain(escape_char.as_deref()),
        )?,
        Expr::BinaryOp { left, op, right } => {
            let sides = all([&**left, &**right])?;
            match op {
                BinaryOperator::PGExp => sum(&sides).plus(Size::constant(NUMERIC_TEXT)),
                op if produces_its_operands(op) => sum(&sides),
                _ => Size {
                    values: 0,
                    constant: Size::SMALL.constant.saturating_add(sum(&sides).constant),
                },
            }
        }
        // At most as long as what they cut from.
        Expr::Substring {
            expr,
            substring_from,
            substring_for,
            ..
        } => {
            all(substring_from
                .iter()
                .chain(substring_for.iter())
                .map(|e| &**e))?;
            bound(expr)?
        }
        Expr::Trim {
            expr,
            trim_what,
            trim_characters,
            ..
        } => {
            all(trim_what.iter().map(|e| &**e))?;
            all(trim_characters.iter().flatten())?;
            bound(expr)?
        }
        Expr::Overlay {
            expr,
            overlay_what,
            overlay_from,
            overlay_for,
        } => {
            all(std::iter::once(&**overlay_from).chain(overlay_for.as_deref()))?;
            bound(expr)?.plus(bound(overlay_what)?)
        }
        // One branch is the value.
        Expr::Case {
            operand,
            conditions,
            else_result,
            ..
        } => {
            let tested = sum(&all(operand.as_deref())?)
                .plus(sum(&all(conditions.iter().map(|c| &c.condition))?));
            let results = all(conditions
                .iter()
                .map(|c| &c.result)
                .chain(else_result.as_deref()))?;
            // One branch is the value; every branch's literals are planned.
            let value = results.iter().fold(Size::default(), |a, b| a.max(*b));
            Size {
                values: value.values,
                constant: sum(&results).constant.saturating_add(tested.constant),
            }
        }
        Expr::Tuple(items) => sum(&all(items)?),
        Expr::Array(array) => sum(&all(&array.elem)?).plus(Size::constant(8 * array.elem.len())),
        Expr::Interval(interval) => small([&*interval.value])?,
        Expr::Function(function) => function_size(function)?,
        other => return Err(format!("expression {other} is not supported")),
    })
}

/// The most characters a `numeric` prints.
const NUMERIC_TEXT: usize = 131_072 + 16_384;

/// The bytes a type's declared lengths may pad a value to (`char(n)`, `bit(n)`: each number
/// in its parentheses, four bytes a character), each at most [`MAX_DECLARED_LENGTH`].
fn type_length(data_type: &str) -> Result<usize, String> {
    let lengths: Vec<usize> = data_type
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|digits| digits.parse::<usize>().ok())
        .collect();
    if lengths.iter().any(|n| *n > MAX_DECLARED_LENGTH) {
        return Err(format!(
            "declares {data_type}; a type's length is at most {MAX_DECLARED_LENGTH} (char and \
             bit pad to it)"
        ));
    }
    Ok(lengths.iter().sum::<usize>() * 4)
}

/// Longest length a cast's type may declare.
const MAX_DECLARED_LENGTH: usize = 10_000;

/// Numbers written with an exponent in `text` (a digit, `e` or `E`, a digit or sign).
fn exponents(text: &str) -> usize {
    text.as_bytes()
        .windows(3)
        .filter(|w| {
            w[0].is_ascii_digit()
                && (w[1] == b'e' || w[1] == b'E')
                && (w[2].is_ascii_digit() || w[2] == b'+' || w[2] == b'-')
        })
        .count()
}

/// A literal format's conversions and the sum of their widths.
fn format_conversions(text: &str) -> (u64, u64) {
    let specs = format_specs(text);
    let widths = specs
        .iter()
        .filter_map(|spec| format_width(spec))
        .fold(0u64, u64::saturating_add);
    (specs.len() as u64, widths)
}

/// Whether an operator's result may hold its operands (`||`, arithmetic, JSON paths), rather
/// than a truth value.
fn produces_its_operands(op: &BinaryOperator) -> bool {
    use BinaryOperator::*;
    !matches!(
        op,
        Gt | Lt
            | GtEq
            | LtEq
            | Eq
            | NotEq
            | And
            | Or
            | PGOverlap
            | PGRegexMatch
            | PGRegexIMatch
            | PGRegexNotMatch
            | PGRegexNotIMatch
            | PGLikeMatch
            | PGILikeMatch
            | PGNotLikeMatch
            | PGNotILikeMatch
            | PGStartsWith
            | AtArrow
            | ArrowAt
            | Question
            | QuestionAnd
            | QuestionPipe
    )
}

fn function_size(function: &Function) -> Result<Size, String> {
    let name = match function.name.0.last().and_then(|part| part.as_ident()) {
        Some(ident) => fold(ident),
        None => return Err(format!("{} is not supported", function.name)),
    };
    let args: &[FunctionArg] = match &function.args {
        FunctionArguments::List(list) => &list.args,
        FunctionArguments::None => &[],
        FunctionArguments::Subquery(_) => {
            return Err(format!(
                "{}() over a subquery is not allowed",
                function.name
            ))
        }
    };
    let exprs = args
        .iter()
        .map(|arg| match arg {
            FunctionArg::Named { arg, .. }
            | FunctionArg::ExprNamed { arg, .. }
            | FunctionArg::Unnamed(arg) => match arg {
                FunctionArgExpr::Expr(e) => Ok(e),
                _ => Err(format!("{}() of {arg} is not supported", function.name)),
            },
        })
        .collect::<Result<Vec<_>, _>>()?;
    let sizes = all(exprs.iter().copied())?;
    let arg = |i: usize| sizes.get(i).copied().unwrap_or_default();
    let count = |i: usize| match exprs.get(i) {
        Some(Expr::Value(v)) => match &v.value {
            Value::Number(n, _) => n.parse::<u64>().ok(),
            _ => None,
        },
        _ => None,
    };
    let unbounded = Size {
        values: u64::MAX,
        constant: u64::MAX,
    };
    Ok(match name.as_str() {
        // As long as a literal count says (characters of up to four bytes).
        "repeat" => arg(0).times(count(1).unwrap_or(u64::MAX)),
        "lpad" | "rpad" => count(1).map_or(unbounded, |n| Size::constant(4 * n as usize)),
        // Each character may become the replacement (an empty match is at every one).
        "replace" | "regexp_replace" => arg(0).each_becoming(arg(2)),
        // The separator between every two elements, the text for NULL in each.
        "array_to_string" => arg(0).each_becoming(arg(1).plus(arg(2))),
        // An element a character, each of some bytes of its own.
        "string_to_array" => arg(0).times(10).plus(arg(1)),
        "array_replace" => arg(0).each_becoming(arg(2)),
        // Each capture of the pattern's groups may be the whole text.
        "regexp_match" => match literal_text(args.get(1)) {
            Some(pattern) => arg(0).times(pattern.matches('(').count() as u64 + 1),
            None => arg(0).each_becoming(arg(1)),
        },
        // Each conversion copies an argument, quoted (quotes doubled) for `%L` and `%I`, and
        // pads it to its width. (The guard takes only a literal format.)
        "format" => {
            let (conversions, widths) =
                literal_text(args.first()).map_or((32, 32 * 10_000), format_conversions);
            sizes[1.min(sizes.len())..]
                .iter()
                .fold(Size::default(), |a, b| a.max(*b))
                .times(2 * conversions)
                .plus(arg(0))
                .plus(Size::constant(4 * widths as usize))
        }
        // A power's digits: up to 131,072 before the point and 16,383 after.
        "power" | "exp" => sum(&sizes).plus(Size::constant(NUMERIC_TEXT)),
        // As many digits after the point as the scale asks.
        "round" | "trunc" => {
            let scale = count(1).map_or(if sizes.len() > 1 { 16_384 } else { 0 }, |n| n as usize);
            arg(0).plus(Size::constant(scale))
        }
        // The separator between every two arguments.
        "concat_ws" => sum(&sizes[1.min(sizes.len())..]).plus(arg(0).times(sizes.len() as u64)),
        // `escape` writes a byte as four characters; `hex` two, `base64` under two.
        "encode" => arg(0).times(4).plus(arg(1)),
        // JSON escapes a control character as six (`\u0001`).
        "to_json" | "to_jsonb" | "json_build_array" | "json_build_object" | "jsonb_build_array"
        | "jsonb_build_object" => sum(&sizes).times(6).plus(Size::constant(8 * sizes.len())),
        // A character's case or replacement may take more bytes than it did.
        "upper" | "lower" | "initcap" => arg(0).times(3),
        "translate" => arg(0).times(4).plus(arg(1)).plus(arg(2)),
        // Each pattern of the format may write several characters ('Month', 'TH').
        "to_char" => arg(0).plus(arg(1).times(10)),
        "md5" | "sha256" | "chr" | "length" | "char_length" | "character_length"
        | "octet_length" | "array_length" | "cardinality" | "array_position" | "strpos"
        | "position" | "starts_with" | "sign" | "width_bucket" | "date_part" | "make_date"
        | "make_interval" | "make_timestamp" | "to_date" | "to_timestamp" | "now"
        | "current_timestamp" | "current_date" => Size::SMALL,
        // The others make at most what they are given (a trim, a substring, a concatenation,
        // a number's digits, one of their arguments).
        _ => sum(&sizes).plus(Size::SMALL),
    })
}

#[cfg(test)]
mod tests {
    use super::super::guard::check;

    fn refused(sql: &str) -> String {
        check(sql).expect_err(sql)
    }

    /// Functions that double or multiply, nested, make gigabytes from a few hundred bytes of
    /// SQL, and PostgreSQL folds constants while it plans: a preflight's `EXPLAIN` was enough.
    #[test]
    fn what_multiplies_is_refused_however_it_is_spelled() {
        let mut doubling = "'aaaaaaaa'::bytea".to_owned();
        for _ in 0..12 {
            doubling = format!("encode({doubling}, 'hex')::bytea");
        }
        let a = "a".repeat(101);
        let quoted = format!(
            "replace(\"replace\"(\"replace\"(\"replace\"('aaaaaaaaa','a','{a}'),'a','{a}'),'a','{a}'),'a','{a}')"
        );
        let columns = format!("concat({})", vec!["note"; 100].join(", "));
        let concatenated = format!("concat({})", vec![columns.as_str(); 100].join(", "));
        for value in [
            format!("encode({doubling}, 'hex')"),
            quoted,
            "pg_catalog.\"replace\"(pg_catalog.\"replace\"(note, 'a', 'bbbbbbbbbbbbbbbbbbbb'), 'b', 'cccccccccccccccccccc')".to_owned(),
            concatenated,
            "to_json(to_json(to_json(to_json(note))))::text".to_owned(),
            "array_replace(string_to_array(note, NULL), 'a', note)::text".to_owned(),
            "upper(upper(upper(upper(upper(upper(note))))))".to_owned(),
            "replace(0::bit(83886080)::text, '0', 'aaaaaaaaaaa')".to_owned(),
            "replace(CAST(note AS char(900000)), ' ', 'aa')".to_owned(),
            "replace(\"format\"('%9999s%9999s%9999s', note, note, note), ' ', 'aaaaaaaaaaaaaaaaaaaaaaaa')".to_owned(),
            "replace((10::numeric ^ 131000)::text, '0', 'aaaaaaaaaaa')".to_owned(),
            format!("'[{}]'::jsonb::text", vec!["1e131000"; 7000].join(",")),
            format!("'{{{}}}'::char(200)[]::text", vec!["a"; 4000].join(",")),
            "note::jsonb::text".to_owned(),
            "repeat('a', 10)::char(200000)".to_owned(),
        ] {
            let sql = format!("UPDATE items SET note = {value} WHERE id = 1");
            let why = refused(&sql);
            let growth = ["may make", "casts a column's value", "a type's length is at most"];
            assert!(growth.iter().any(|g| why.contains(g)), "{sql}: {why}");
        }
        // Long literals, each within bounds, thousands of them in one statement.
        let listed = vec!["char(10000) ''"; 500].join(", ");
        let sql = format!("DELETE FROM items WHERE note IN ({listed})");
        assert!(refused(&sql).contains("from literals"));
        // Each SET column within bounds, the statement not.
        let columns: Vec<String> = (0..30)
            .map(|i| format!("c{i} = repeat('a', 10000)::char(10000)"))
            .collect();
        let sql = format!("UPDATE items SET {} WHERE id = 1", columns.join(", "));
        assert!(refused(&sql).contains("in all"));
        // In a WHERE clause too: the planner folds it there as well.
        let sql = format!("DELETE FROM items WHERE note = encode({doubling}, 'hex')");
        assert!(refused(&sql).contains("may make a value of"));
    }

    /// What patches write stays well within the bounds.
    #[test]
    fn ordinary_patches_pass() {
        for sql in [
            "UPDATE items SET note = lower(trim(note)) || ' (' || upper(code) || ')' WHERE id = 1",
            "UPDATE items SET note = replace(note, 'colour', 'color'), price = round(price * 1.1, 2)",
            "UPDATE items SET note = format('%s-%s', code, id), meta = jsonb_set(meta, '{a}', to_jsonb(note))",
            "UPDATE items SET note = upper(format('%s %s %s %s %s', a, b, c, d, e)), code = left(code, 8)::varchar(8)",
            "UPDATE items SET price = round(price * 1.1, 2), total = power(qty, 2) * 0.5",
            "UPDATE items SET note = replace(round(price, 2)::text, '.', ','), code = code::varchar(255)",
            "UPDATE items SET meta = jsonb_build_object('a', round(a, 2), 'b', round(b, 2)), total = total::numeric(12,2)",
            "UPDATE items SET note = format('%s %s %s %s', a, b, c, round(d, 2)), meta = '{\"n\": 1.5e3}'::jsonb",
            "UPDATE items SET note = concat_ws(', ', a, b, c, d), day = to_char(created_at, 'YYYY-MM-DD')",
            "UPDATE items SET note = CASE WHEN note IS NULL THEN repeat('-', 10) ELSE lpad(note, 20, '0') END",
            "UPDATE items SET note = array_to_string(string_to_array(note, ','), ';')",
            "DELETE FROM items WHERE encode(sha256(note::bytea), 'hex') = 'abc' AND id IN (1, 2, 3)",
        ] {
            check(sql).unwrap_or_else(|why| panic!("{sql}: {why}"));
        }
    }
}
