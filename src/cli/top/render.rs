//! Draws a [`Model`]: a pure function of it, so frames can be checked on ratatui's
//! `TestBackend` exactly as a terminal would show them.
//!
//! Below 120 columns the table keeps what fits in 80 (state, weight bar, open/slots, queue,
//! rates, connect p99); from 120 on it adds the pool, the state's reason, the weights as
//! numbers, the load estimate, totals and failures. Without colour every state is still told
//! by its text, a change by the `*` in the first column, the selection by reverse video.

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Cell, Paragraph, Row as TableRow, Table, TableState};

use super::model::{Model, Row};
use crate::cli::ctl::Action;
use crate::cli::format;

/// From this width on, the wide table.
const WIDE: u16 = 120;

/// Cells of the effective-weight bar.
const BAR: usize = 6;

/// Draws the whole screen.
pub(crate) fn render(frame: &mut Frame<'_>, model: &Model) {
    let [header, table, footer] = Layout::vertical([
        Constraint::Length(3),
        Constraint::Min(0),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    render_header(frame, header, model);
    render_table(frame, table, model);
    render_footer(frame, footer, model);
}

fn style(model: &Model, color: Color) -> Style {
    if model.color {
        Style::new().fg(color)
    } else {
        Style::new()
    }
}

fn rate(value: Option<f64>, show: fn(f64) -> String) -> String {
    value.map_or_else(|| "-".to_owned(), show)
}

fn render_header(frame: &mut Frame<'_>, area: Rect, model: &Model) {
    let mut lines = Vec::with_capacity(3);
    let status = model.current.as_ref().map(|c| &c.reading.status);
    let mut first = vec![Span::styled(
        format!("weighbridge {}", status.map_or("", |s| s.version.as_str())),
        Style::new().add_modifier(Modifier::BOLD),
    )];
    first.push(Span::raw(format!("  {}", model.endpoint)));
    if let Some(up) = status.and_then(|s| s.uptime_seconds) {
        first.push(Span::raw(format!("  up {}", format::uptime(up))));
    }
    if let Some(s) = status {
        first.push(Span::raw(format!(
            "  reloads {} ok {} failed",
            s.reloads.succeeded, s.reloads.failed
        )));
    }
    lines.push(Line::from(first));

    let totals = model.totals();
    lines.push(Line::from(format!(
        "conns {} open, {} queued  {} conn/s  {} rejected/s  in {}/s  out {}/s",
        totals.open,
        totals.queued,
        rate(totals.accept_rate, format::count),
        rate(totals.reject_rate, format::count),
        rate(totals.in_rate, format::bytes),
        rate(totals.out_rate, format::bytes),
    )));

    let third = if let Some(error) = &model.error {
        let age = if model.current.is_some() {
            ", last data shown"
        } else {
            ""
        };
        Line::from(Span::styled(
            // The retry first: a long error is cut at the screen's edge.
            format!(
                "! retrying every {}{age}: {error}",
                humantime::format_duration(model.interval)
            ),
            style(model, Color::Red).add_modifier(Modifier::BOLD),
        ))
    } else if model.current.is_none() {
        Line::from(format!("reading {} ...", model.endpoint))
    } else if let Some(notice) = &model.notice {
        Line::from(Span::styled(notice.clone(), style(model, Color::Yellow)))
    } else {
        let listeners = status.map_or_else(Vec::new, |s| {
            s.listeners
                .iter()
                .map(|l| {
                    let flag = if l.connections.all_unhealthy {
                        " ALL UNHEALTHY"
                    } else {
                        ""
                    };
                    format!("{} {} open{flag}", l.name, l.connections.open)
                })
                .collect()
        });
        Line::from(listeners.join("  "))
    };
    lines.push(third);
    frame.render_widget(Paragraph::new(lines), area);
}

/// A state's colour.
fn state_color(state: &str) -> Color {
    match state {
        "healthy" => Color::Green,
        "ramping" => Color::Cyan,
        "starting" | "drained" => Color::Yellow,
        _ => Color::Red,
    }
}

/// `effective` of `max` as a bar of [`BAR`] cells, to the eighth of a cell.
fn bar(effective: f64, max: f64) -> String {
    const EIGHTHS: [char; 8] = [' ', '▏', '▎', '▍', '▌', '▋', '▊', '▉'];
    if max <= 0.0 || effective <= 0.0 {
        return String::new();
    }
    let eighths = ((effective / max).min(1.0) * (BAR * 8) as f64)
        .round()
        .max(1.0) as usize;
    let mut text = "█".repeat(eighths / 8);
    if eighths % 8 != 0 {
        text.push(EIGHTHS[eighths % 8]);
    }
    text
}

fn render_table(frame: &mut Frame<'_>, area: Rect, model: &Model) {
    let rows = model.rows();
    let wide = area.width >= WIDE;
    let max_weight = rows.iter().map(|r| r.weight).fold(0.0, f64::max);
    let mut header = vec!["", "BACKEND"];
    let mut widths = vec![Constraint::Length(1)];
    if wide {
        header.push("POOL");
        header[1] = "BACKEND";
    }
    let (state_width, addr_width) = if wide { (24, 23) } else { (9, 21) };
    widths.push(Constraint::Length(addr_width));
    if wide {
        widths.push(Constraint::Length(14));
    }
    header.extend(["STATE", "WEIGHT"]);
    widths.extend([
        Constraint::Length(state_width),
        Constraint::Length(BAR as u16),
    ]);
    if wide {
        header.push("EFF/CONF");
        widths.push(Constraint::Length(9));
    }
    header.extend(["OPEN", "Q", "CONN/S", "IN/S", "OUT/S", "P99"]);
    widths.extend([
        Constraint::Length(7),
        Constraint::Length(3),
        Constraint::Length(6),
        Constraint::Length(6),
        Constraint::Length(6),
        Constraint::Length(5),
    ]);
    if wide {
        header.extend(["LOAD", "CONNS", "FAILS"]);
        widths.extend([
            Constraint::Length(5),
            Constraint::Length(7),
            Constraint::Length(5),
        ]);
    }
    let right_from = if wide { 5 } else { 4 };
    let header_row = TableRow::new(header.iter().enumerate().map(|(i, h)| {
        let text = if i >= right_from && !h.is_empty() {
            Line::from(*h).right_aligned()
        } else {
            Line::from(*h)
        };
        Cell::from(text)
    }))
    .style(Style::new().add_modifier(Modifier::BOLD | Modifier::UNDERLINED));

    let table_rows = rows
        .iter()
        .map(|row| table_row(model, row, wide, max_weight));
    let table = Table::new(table_rows, widths)
        .header(header_row)
        .column_spacing(1)
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED));
    let mut state =
        TableState::default().with_selected((!rows.is_empty()).then_some(model.selected));
    frame.render_stateful_widget(table, area, &mut state);
    if rows.is_empty() && model.current.is_some() {
        let empty = Rect {
            y: area.y + 1,
            height: 1,
            ..area
        };
        frame.render_widget(Paragraph::new("no backend"), empty);
    }
}

fn table_row<'a>(model: &Model, row: &'a Row, wide: bool, max_weight: f64) -> TableRow<'a> {
    let right = |text: String| Cell::from(Line::from(text).right_aligned());
    let marker = if row.changed { "*" } else { " " };
    let mut cells = vec![Cell::from(marker), Cell::from(row.addr.as_str())];
    if wide {
        cells.push(Cell::from(row.pool.as_str()));
    }
    let state_text = if wide {
        row.state_text.clone()
    } else {
        row.state.to_owned()
    };
    cells.push(Cell::from(Span::styled(
        state_text,
        style(model, state_color(row.state)),
    )));
    cells.push(Cell::from(Span::styled(
        bar(row.effective, max_weight),
        style(model, state_color(row.state)),
    )));
    if wide {
        cells.push(right(format!(
            "{}/{}",
            format::weight(row.effective),
            format::weight(row.weight)
        )));
    }
    let slots = row.slots.map_or_else(|| "-".to_owned(), |s| s.to_string());
    cells.push(right(format!("{}/{slots}", row.open)));
    cells.push(right(row.queue.to_string()));
    cells.push(right(rate(row.conn_rate, format::count)));
    cells.push(right(rate(row.in_rate, compact_bytes)));
    cells.push(right(rate(row.out_rate, compact_bytes)));
    cells.push(right(format::latency(row.p99)));
    if wide {
        cells.push(right(row.load.to_string()));
        cells.push(right(format::count(row.connections as f64)));
        cells.push(right(row.failures.to_string()));
    }
    let mut style = Style::new();
    if row.changed {
        style = style.add_modifier(Modifier::BOLD);
    }
    TableRow::new(cells).style(style)
}

/// Bytes without the space (`2.0KiB`): six cells, so the rates fit in 80 columns.
fn compact_bytes(n: f64) -> String {
    format::bytes(n).replace(' ', "")
}

fn render_footer(frame: &mut Frame<'_>, area: Rect, model: &Model) {
    let line = if let Some(pending) = &model.confirm {
        let verb = match pending.action {
            Action::Drain => "Drain",
            Action::Enable => "Enable",
        };
        Line::from(Span::styled(
            format!(
                "{verb} {} in pool {}? y: yes, any other key: no",
                pending.addr, pending.pool
            ),
            style(model, Color::Yellow).add_modifier(Modifier::BOLD | Modifier::REVERSED),
        ))
    } else {
        let filter = model.filter.as_deref().unwrap_or("all");
        let order = if model.descending { " rev" } else { "" };
        Line::from(format!(
            "q quit  jk/↑↓ select  s sort:{}{order}  f filter:{filter}  d drain  e enable",
            model.sort.label()
        ))
    };
    frame.render_widget(Paragraph::new(line), area);
}

#[cfg(test)]
mod tests {
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;
    use ratatui::buffer::Buffer;

    use super::*;
    use crate::cli::top::model::tests::model;

    fn draw(model: &Model, width: u16, height: u16) -> Buffer {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).expect("a test terminal");
        terminal
            .draw(|frame| render(frame, model))
            .expect("draw a frame");
        terminal.backend().buffer().clone()
    }

    /// The screen's lines, trailing blanks trimmed.
    fn lines(buffer: &Buffer) -> Vec<String> {
        let area = buffer.area;
        (0..area.height)
            .map(|y| {
                (0..area.width)
                    .map(|x| buffer[(x, y)].symbol())
                    .collect::<String>()
                    .trim_end()
                    .to_owned()
            })
            .collect()
    }

    fn line_with<'a>(lines: &'a [String], needle: &str) -> &'a str {
        lines
            .iter()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{}", lines.join("\n")))
    }

    #[test]
    fn at_80_by_24_everything_fits_on_its_line() {
        let buffer = draw(&model(true), 80, 24);
        let lines = lines(&buffer);
        assert!(
            lines[0].starts_with("weighbridge 0.1.0  127.0.0.1:9900  up 1h00m"),
            "{}",
            lines[0]
        );
        assert_eq!(
            lines[1],
            "conns 13 open, 2 queued  15 conn/s  0 rejected/s  in 2.9 KiB/s  out 12 KiB/s"
        );
        assert_eq!(lines[2], "chat 13 open  embed 0 open");
        assert_eq!(
            lines[3],
            "  BACKEND               STATE     WEIGHT    OPEN   Q CONN/S   IN/S  OUT/S   P99"
        );
        assert_eq!(
            lines[4],
            "  10.0.0.5:8000         healthy   ██████   12/16   2     10 2.0KiB 7.8KiB   2ms"
        );
        assert_eq!(
            lines[5],
            "* 10.0.0.6:8000         drained             1/16   2      5  1000B 3.9KiB     -"
        );
        assert!(line_with(&lines, "10.0.0.7:8000").contains("unhealthy"));
        assert!(line_with(&lines, "10.0.1.5:9000").contains("healthy"));
        assert!(lines[23].starts_with("q quit"), "{}", lines[23]);
        assert!(lines.iter().all(|l| l.chars().count() <= 80));
        // Colour marks the states; the selected row is in reverse video.
        assert_eq!(buffer[(24, 4)].fg, Color::Green);
        assert_eq!(buffer[(24, 6)].fg, Color::Red);
        assert!(buffer[(2, 4)].modifier.contains(Modifier::REVERSED));
        assert!(!buffer[(2, 5)].modifier.contains(Modifier::REVERSED));
    }

    #[test]
    fn at_200_by_50_the_pool_reason_and_totals_show() {
        let buffer = draw(&model(true), 200, 50);
        let lines = lines(&buffer);
        let header = &lines[3];
        for column in [
            "BACKEND", "POOL", "STATE", "EFF/CONF", "OPEN", "P99", "LOAD", "CONNS", "FAILS",
        ] {
            assert!(header.contains(column), "{header}");
        }
        let unhealthy = line_with(&lines, "10.0.0.7:8000");
        assert!(unhealthy.contains("llama"), "{unhealthy}");
        assert!(unhealthy.contains("unhealthy: http 503"), "{unhealthy}");
        assert!(unhealthy.contains("0/2"), "{unhealthy}");
        let busy = line_with(&lines, "10.0.0.5:8000");
        assert!(
            busy.contains("2/2") && busy.ends_with("100     0"),
            "{busy}"
        );
        assert!(lines[49].starts_with("q quit"), "{}", lines[49]);
        assert!(
            lines[8..49].iter().all(String::is_empty),
            "the rest is blank"
        );
    }

    #[test]
    fn without_colour_states_are_text_and_changes_are_marked() {
        let buffer = draw(&model(false), 80, 24);
        let area = buffer.area;
        for y in 0..area.height {
            for x in 0..area.width {
                assert_eq!(buffer[(x, y)].fg, Color::Reset, "colour at {x},{y}");
            }
        }
        let lines = lines(&buffer);
        assert!(line_with(&lines, "10.0.0.6:8000").starts_with("* "));
        assert!(line_with(&lines, "10.0.0.7:8000").contains("unhealthy"));
    }

    #[test]
    fn a_confirmation_an_error_and_a_filter_show_where_expected() {
        let mut model = model(true);
        model.on_key(ratatui::crossterm::event::KeyEvent::from(
            ratatui::crossterm::event::KeyCode::Char('d'),
        ));
        model.error = Some("cannot reach the admin endpoint at 127.0.0.1:9900".to_owned());
        let screen = lines(&draw(&model, 80, 24));
        assert_eq!(
            screen[2],
            "! retrying every 1s, last data shown: cannot reach the admin endpoint at 127.0.0"
        );
        assert_eq!(
            screen[23],
            "Drain 10.0.0.5:8000 in pool llama? y: yes, any other key: no"
        );

        let mut model = super::super::model::tests::model(true);
        model.filter = Some("embed".to_owned());
        let lines = lines(&draw(&model, 80, 24));
        assert!(lines[4].contains("10.0.1.5:9000"), "{}", lines[4]);
        assert!(lines[5].is_empty());
        assert!(lines[23].contains("f filter:embed"), "{}", lines[23]);
    }

    #[test]
    fn many_backends_scroll_to_keep_the_selection_in_view() {
        let mut model = model(true);
        let many: Vec<_> = (0..40)
            .map(|i| {
                let mut b = model.current.as_ref().expect("read").reading.status.pools[0].backends
                    [0]
                .clone();
                b.addr = format!("10.0.2.{i}:8000");
                b
            })
            .collect();
        if let Some(current) = model.current.as_mut() {
            current.reading.status.pools[0].backends = many;
        }
        model.selected = 39;
        let lines = lines(&draw(&model, 80, 24));
        assert!(
            line_with(&lines, "10.0.2.39:8000").starts_with("* 10.0.2.39"),
            "new: marked"
        );
        assert!(
            lines[22].contains("10.0.2.39:8000"),
            "the last row shows at the bottom"
        );
        assert!(lines[23].starts_with("q quit"));
    }

    #[test]
    fn the_bar_is_the_share_of_the_largest_weight() {
        assert_eq!(bar(2.0, 2.0), "██████");
        assert_eq!(bar(1.0, 2.0), "███");
        assert_eq!(bar(0.0, 2.0), "");
        assert_eq!(bar(0.01, 2.0), "▏", "a small weight still shows");
    }
}
