//! Value parsers for numeric flags: a value outside its range is a usage error (exit 2) that
//! says what the flag accepts, instead of being accepted silently or failing later.

/// A whole number of at least 1 (`--threads`, `--batch-size`, `-k`).
pub fn positive(s: &str) -> Result<usize, String> {
    match count(s)? {
        0 => Err("must be at least 1".into()),
        n => Ok(n),
    }
}

/// A whole number of at least 0 (`-n`).
pub fn count(s: &str) -> Result<usize, String> {
    s.trim()
        .parse::<usize>()
        .map_err(|_| format!("'{s}' is not a whole number of 0 or more"))
}

fn number(s: &str) -> Result<f32, String> {
    s.trim()
        .parse::<f32>()
        .ok()
        .filter(|x| x.is_finite())
        .ok_or_else(|| format!("'{s}' is not a number"))
}

/// 0 or more (`--temperature`, `--repeat-penalty` needs more than 0: see [`above_zero`]).
pub fn non_negative(s: &str) -> Result<f32, String> {
    let x = number(s)?;
    if x < 0.0 {
        return Err(format!("must be 0 or more, got {x}"));
    }
    Ok(x)
}

/// More than 0.
pub fn above_zero(s: &str) -> Result<f32, String> {
    let x = number(s)?;
    if x <= 0.0 {
        return Err(format!("must be more than 0, got {x}"));
    }
    Ok(x)
}

/// A probability in [0, 1] (`--top-p`, `--min-p`).
pub fn probability(s: &str) -> Result<f32, String> {
    let x = number(s)?;
    if !(0.0..=1.0).contains(&x) {
        return Err(format!("must be between 0 and 1, got {x}"));
    }
    Ok(x)
}

/// A dropout rate: 1 would keep nothing (and divide by zero).
pub fn dropout(s: &str) -> Result<f32, String> {
    let x = number(s)?;
    if !(0.0..1.0).contains(&x) {
        return Err(format!("must be at least 0 and below 1, got {x}"));
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(positive("3"), Ok(3));
        assert!(positive("0").is_err() && positive("-5").is_err() && positive("x").is_err());
        assert_eq!(count("0"), Ok(0));
        assert!(count("-5").unwrap_err().contains("whole number"));
        assert!(non_negative("-1").is_err() && non_negative("nan").is_err());
        assert_eq!(non_negative("0"), Ok(0.0));
        assert!(probability("2").is_err() && probability("1").is_ok());
        assert!(above_zero("0").is_err());
    }
}
