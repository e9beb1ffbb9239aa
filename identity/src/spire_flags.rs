//! SPIRE's command-line habits: its CLIs take single-dash camel-case flags (`-spiffeID`,
//! `-parentID`, `-selector`, `-socketPath`). This project's CLIs use `--kebab-case`; a
//! SPIRE spelling is answered with the flag to use instead of a parser error about `-s`.

/// SPIRE flags and their names here.
const FLAGS: &[(&str, &str)] = &[
    ("-spiffeID", "--spiffe-id"),
    ("-parentID", "--parent-id"),
    ("-selector", "--selector"),
    ("-socketPath", "--socket-path"),
    ("-entryID", "--entry-id"),
    ("-data", "--data"),
    ("-dns", "--dns"),
    ("-admin", "--admin"),
    ("-hint", "--hint"),
    ("-x509SVIDTTL", "--x509-svid-ttl"),
    ("-jwtSVIDTTL", "--jwt-svid-ttl"),
    ("-ttl", "--ttl"),
    ("-audience", "--audience"),
    ("-output", "--output"),
    ("-config", "--config"),
];

/// For the first argument in `args` spelled like a SPIRE flag, a message naming the flag to
/// use; `None` when there is none.
pub fn hint<S: AsRef<str>>(args: &[S]) -> Option<String> {
    args.iter().find_map(|a| {
        let a = a.as_ref();
        let name = a.split_once('=').map_or(a, |(n, _)| n);
        FLAGS
            .iter()
            .find(|(spire, _)| *spire == name)
            .map(|(spire, ours)| {
                format!("`{spire}` is SPIRE's spelling of this flag: use `{ours}` (flags here are --kebab-case)")
            })
    })
}

/// [`hint`] for this process's own arguments.
pub fn hint_for_this_process() -> Option<String> {
    let args: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    hint(&args)
}

#[cfg(test)]
mod tests {
    use super::hint;

    #[test]
    fn spire_flags_are_answered_with_ours() {
        let m = hint(&["entry", "create", "-spiffeID", "spiffe://x/y"]).unwrap();
        assert!(m.contains("`--spiffe-id`"), "{m}");
        assert!(hint(&["-socketPath=/tmp/a"])
            .unwrap()
            .contains("--socket-path"));
        assert!(hint(&["entry", "create", "--spiffe-id", "spiffe://x/y", "-h"]).is_none());
        assert!(hint(&["-s"]).is_none());
    }
}
