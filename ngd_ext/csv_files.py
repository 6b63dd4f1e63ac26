"""CSV files as datasets and users hand them over: UTF-8, with or without the byte-order mark that spreadsheet
programs put at the start."""

import csv


def read_rows(path, error):
    """Yield the rows of the CSV file at `path`, each a list of fields, the byte-order mark dropped. Bytes that are not
    UTF-8, and quoting that is not CSV's (a quote never closed, text after a closing quote), raise `error`, an
    exception class, with a message naming the file and where."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, strict=True)
        try:
            yield from reader
        except UnicodeDecodeError as decode_error:
            # Text is decoded a block at a time, so the bad byte lies somewhere after the lines read so far.
            raise error(f"{path}: not UTF-8 text after line {reader.line_num} ({decode_error.reason})") \
                from decode_error
        except csv.Error as csv_error:
            raise error(f"{path}, line {reader.line_num}: not valid CSV ({csv_error})") from csv_error
