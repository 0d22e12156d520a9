//! Every `rill` command's `--help` ends with an example that parses as that command: new
//! subcommands fail here, by name, until they get one.

use clap::{ArgMatches, Command, CommandFactory};

use super::Cli;

/// The first line under `Example:` in a command's closing help, if any.
fn example_of(cmd: &Command) -> Option<String> {
    let help = cmd
        .get_after_help()
        .or_else(|| cmd.get_after_long_help())?
        .to_string();
    let mut lines = help.lines();
    lines.find(|l| l.trim_end() == "Example:")?;
    lines
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_string)
}

/// The words of `rill …` in a shell line: from `rill` up to a pipe or a redirection.
fn rill_words(line: &str) -> Option<Vec<String>> {
    let mut words = line.split_whitespace().skip_while(|w| *w != "rill");
    let first = words.next()?;
    let rest = words.take_while(|w| !matches!(*w, "|" | ">" | ">>" | "<" | "&&" | ";" | "#"));
    Some(
        std::iter::once(first)
            .chain(rest)
            .map(str::to_string)
            .collect(),
    )
}

/// The subcommand names a parse chose, outermost first.
fn chosen_path(matches: &ArgMatches) -> Vec<String> {
    let mut path = Vec::new();
    let mut m = matches;
    while let Some((name, sub)) = m.subcommand() {
        path.push(name.to_string());
        m = sub;
    }
    path
}

/// One line per command under `root` whose help lacks an example that parses as it.
fn missing_examples(root: &Command) -> Vec<String> {
    fn walk(root: &Command, cmd: &Command, path: &mut Vec<String>, problems: &mut Vec<String>) {
        let name = std::iter::once("rill")
            .chain(path.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ");
        let hint =
            format!("add #[command(after_help = \"Example:\\n  {name} …\")] to its definition");
        match example_of(cmd) {
            None => problems.push(format!("`{name} --help` has no example: {hint}")),
            Some(line) => match rill_words(&line) {
                None => problems.push(format!(
                    "`{name} --help`'s example {line:?} does not run rill: {hint}"
                )),
                Some(words) => match root.clone().try_get_matches_from(&words) {
                    Err(e) => problems.push(format!(
                        "`{name} --help`'s example {line:?} does not parse: {}",
                        e.to_string().lines().next().unwrap_or_default()
                    )),
                    Ok(m) if !chosen_path(&m).starts_with(path) => problems.push(format!(
                        "`{name} --help`'s example {line:?} runs `rill {}`, not `{name}`",
                        chosen_path(&m).join(" ")
                    )),
                    Ok(_) => {}
                },
            },
        }
        for sub in cmd.get_subcommands() {
            if sub.get_name() == "help" {
                continue;
            }
            path.push(sub.get_name().to_string());
            walk(root, sub, path, problems);
            path.pop();
        }
    }
    let mut problems = Vec::new();
    walk(root, root, &mut Vec::new(), &mut problems);
    problems
}

#[test]
fn every_command_help_has_an_example_that_parses_as_it() {
    let problems = missing_examples(&Cli::command());
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

#[test]
fn a_subcommand_without_an_example_is_named() {
    let root = Command::new("rill")
        .after_help("Example:\n  rill group list")
        .subcommand(
            Command::new("group")
                .after_help("Example:\n  rill group list")
                .subcommand(Command::new("list").after_help("Example:\n  rill group list"))
                .subcommand(Command::new("members"))
                .subcommand(
                    Command::new("delete").after_help("Example:\n  rill group list --force"),
                ),
        )
        .subcommand(Command::new("top").after_help("Example:\n  rill group list"));
    let problems = missing_examples(&root);
    assert_eq!(problems.len(), 3, "{problems:#?}");
    assert!(
        problems[0].starts_with("`rill group members --help` has no example"),
        "{}",
        problems[0]
    );
    assert!(
        problems[1].starts_with("`rill group delete --help`'s example")
            && problems[1].contains("does not parse"),
        "{}",
        problems[1]
    );
    assert!(
        problems[2].contains("runs `rill group list`, not `rill top`"),
        "{}",
        problems[2]
    );
}

#[test]
fn examples_are_cut_at_pipes_and_redirections() {
    assert_eq!(
        rill_words("printf 'a\\n' | rill produce t --key k > out"),
        Some(vec![
            "rill".into(),
            "produce".into(),
            "t".into(),
            "--key".into(),
            "k".into()
        ])
    );
    assert_eq!(rill_words("echo hi"), None);
}
