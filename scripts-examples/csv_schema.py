# csv_schema.py: accept a CSV upload only if every row fits a column schema;
# otherwise refuse it with the line number of the first bad row.
#
# Runs in pre-publish (the whole file arrived, it is still hidden), so a bad
# file never becomes visible and the partner sees exactly what to fix, e.g.
#   "orders.csv line 7, column amount: '12,50' is not a decimal number (like 12.50)"
# Edit COLUMNS to your format. The header row must name the columns in order.
#
# Bind it (scriptsftp.toml):
#
#   [[bindings]]
#   event    = "pre-publish"
#   script   = "csv_schema.py"
#   paths    = ["/inbox/**/*.csv"]
#   allow    = ["read"]             # api.file
#   cpu_time = 10.0                 # about 3 s of CPU per 100,000 rows
#   timeout  = 20.0
#
# Try it:  scriptsftp script test csv_schema.py --event pre-publish \
#              --path /inbox/orders.csv --file ./orders.csv

import csv
import datetime
import re

MAX_LINES = 100_000              # refuse bigger files rather than check them partly


def whole_number(value):
    return re.fullmatch(r"[0-9]{1,18}", value) is not None


def decimal(value):
    return re.fullmatch(r"-?[0-9]+(\.[0-9]{1,4})?", value) is not None


def iso_date(value):
    if re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", value) is None:
        return False
    try:
        datetime.date.fromisoformat(value)    # rejects 2024-02-30
    except ValueError:
        return False
    return True


def currency(value):
    return re.fullmatch(r"[A-Z]{3}", value) is not None


def not_empty(value):
    return value.strip() != ""


# (column name, check, what a good value looks like)
COLUMNS = [
    ("order_id", whole_number, "a whole number"),
    ("date", iso_date, "a date (YYYY-MM-DD)"),
    ("customer", not_empty, "not empty"),
    ("amount", decimal, "a decimal number (like 12.50)"),
    ("currency", currency, "a 3-letter currency code (like EUR)"),
]


def on_pre_publish(event, api):
    name = event.path.rsplit("/", 1)[-1]
    expected = [column for column, _, _ in COLUMNS]
    reader = csv.reader(api.file.lines(MAX_LINES + 1, errors="replace"))
    rows = 0
    for row in reader:
        line = reader.line_num
        if line > MAX_LINES:
            api.veto(f"{name} has more than {MAX_LINES} lines")
        if any("\ufffd" in field for field in row):
            api.veto(f"{name} line {line}: not valid UTF-8 text (save the file as UTF-8)")
        if line == 1:
            header = [h.strip().lstrip("\ufeff") for h in row]   # Excel adds a BOM
            if header != expected:
                api.veto(f"{name} line 1: the header must be {','.join(expected)}"
                         f" (found {','.join(header)})")
            continue
        if not row:                                              # blank line
            continue
        if len(row) != len(COLUMNS):
            api.veto(f"{name} line {line}: {len(row)} fields, expected {len(COLUMNS)}")
        for value, (column, check, good) in zip(row, COLUMNS):
            if not check(value):
                api.veto(f"{name} line {line}, column {column}: {value[:40]!r} is not {good}")
        rows += 1
    if reader.line_num == 0:
        api.veto(f"{name} is empty")
    api.log("csv accepted", path=event.path, rows=rows)
