"""Reports on inspection results (vision: top-activating images of a unit)."""
