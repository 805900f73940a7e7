"""classlab: image-classification studies from one YAML file."""

__version__ = "0.1.0"
# Run folders record the format version; a reader refuses folders from a newer one.
RUN_FORMAT_VERSION = 1
