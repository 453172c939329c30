"""Slide-reading back ends (one module each) behind `SlideReader`; open slides with `cmrcnet.data.slide_reader`."""
