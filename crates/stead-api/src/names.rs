//! App names are DNS labels (they become `<app>.<domain>`), so they are
//! checked in one place for the CLI and the server alike.

/// Checks an app name: lowercase letters, digits and `-`, 3 to 40
/// characters, starting with a letter and not ending with `-`.
pub fn validate_app_name(name: &str) -> Result<(), String> {
    let len = name.chars().count();
    if !(3..=40).contains(&len) {
        return Err(format!(
            "app name {name:?} must be 3 to 40 characters long (it has {len})"
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!(
            "app name {name:?} may contain only lowercase letters, digits and '-' (found {bad:?})"
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(format!(
            "app name {name:?} must start with a lowercase letter"
        ));
    }
    if name.ends_with('-') {
        return Err(format!("app name {name:?} must not end with '-'"));
    }
    Ok(())
}

/// Checks an environment variable name the way POSIX shells accept it.
pub fn validate_env_key(key: &str) -> Result<(), String> {
    let ok = !key.is_empty()
        && key.len() <= 256
        && key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "environment variable name {key:?} is invalid: use letters, digits and '_', not starting with a digit"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_names() {
        assert!(validate_app_name("hello").is_ok());
        assert!(validate_app_name("my-app-2").is_ok());
        assert!(validate_app_name("ab").is_err());
        assert!(validate_app_name(&"a".repeat(41)).is_err());
        assert!(validate_app_name("Hello").is_err());
        assert!(validate_app_name("1abc").is_err());
        assert!(validate_app_name("abc-").is_err());
        assert!(validate_app_name("a_bc").is_err());
        assert!(validate_app_name("a.bc").is_err());
    }

    #[test]
    fn env_keys() {
        assert!(validate_env_key("DATABASE_URL").is_ok());
        assert!(validate_env_key("_x1").is_ok());
        assert!(validate_env_key("1X").is_err());
        assert!(validate_env_key("A-B").is_err());
        assert!(validate_env_key("").is_err());
    }
}
