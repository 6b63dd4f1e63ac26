"""Files as datasets and users hand them over: CSV (UTF-8, with or without the byte-order mark that spreadsheet
programs put at the start), and images decoded to grey uint8 pixels, the one decoder behind every face image the
stages read."""

import csv

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


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


# PIL's modes of 16-bit grey (PNG, TIFF, PGM). convert("L") clips them instead of scaling: a 16-bit photo would
# become almost white.
SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N")


def grey_pixels(image, path):
    """An open PIL image as grey uint8 pixels. 16-bit grey is scaled to 8 bits (v * 257 becomes v); 32-bit integer
    and floating-point images are refused, since no convention fixes their range of values."""
    if image.mode in SIXTEEN_BIT_GREY:
        return np.rint(np.asarray(image, dtype=np.float64) / 257).astype(np.uint8)
    if image.mode in ("I", "F"):
        kind = "floating-point" if image.mode == "F" else "integer"
        raise OSError(f"{path}: a 32-bit {kind} image (PIL mode {image.mode}), whose range of values no convention "
                      "fixes; save it with 8 or 16 bits per sample")
    return np.asarray(image.convert("L"))


def read_grey(path, upright):
    """A grey uint8 image; OSError (missing, undecodable, too large to decode, a mode with no fixed range) names the
    file. upright: turned as its EXIF orientation says (a phone's photo taken sideways), for finding faces in it;
    False where a dataset's face box refers to the pixels as stored."""
    try:
        with Image.open(path) as image:
            return grey_pixels(ImageOps.exif_transpose(image) if upright else image, path)
    except UnidentifiedImageError as error:
        raise OSError(f"{path}: not an image file PIL can decode") from error
    except Image.DecompressionBombError as error:  # a header claiming a vast image: damaged, or a giant panorama
        raise OSError(f"{path}: {error}") from error
    except (ValueError, SyntaxError) as error:  # PIL reports some truncated or corrupt files this way
        raise OSError(f"{path}: corrupt image ({error})") from error
    except OSError as error:
        if error.filename is not None or str(error).startswith(f"{path}:"):
            raise  # it names the file already: a missing or unreadable one, or a refusal above
        raise OSError(f"{path}: corrupt or truncated image ({error})") from error  # PIL's decoders name none
