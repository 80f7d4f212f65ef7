//! `weighbridge completions SHELL` and `weighbridge manpage`: the shell completion scripts and
//! the `weighbridge.1` man page, both generated from the clap definition so they never list a
//! flag the binary does not have.

use std::io::Write;

use clap_complete::Shell;

/// Writes the completion script for `shell` to stdout.
pub(crate) fn print_completions(shell: Shell, mut command: clap::Command) -> Result<(), String> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, "weighbridge", &mut script);
    write_stdout(&script)
}

/// Writes the man page, in roff, to stdout.
pub(crate) fn print_manpage(command: clap::Command) -> Result<(), String> {
    let mut page = Vec::new();
    clap_mangen::Man::new(command)
        .render(&mut page)
        .map_err(|e| format!("cannot render the man page: {e}"))?;
    write_stdout(&page)
}

fn write_stdout(bytes: &[u8]) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|e| format!("cannot write to stdout: {e}"))
}
