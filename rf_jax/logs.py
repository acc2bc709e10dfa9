"""Logging set-up shared by the command-line programs."""

import logging

from absl import logging as absl_logging


class _QuietLibraries(logging.Filter):
    """Drop INFO records of Orbax and Grain, which log every step of every save."""

    def filter(self, record):
        noisy = ("/orbax/" in record.pathname) or ("/grain/" in record.pathname)
        return record.levelno >= logging.WARNING or not noisy


def quiet_library_logs():
    """Keep warnings and errors of Orbax and Grain, and drop their INFO records."""
    absl_logging.get_absl_handler().addFilter(_QuietLibraries())
