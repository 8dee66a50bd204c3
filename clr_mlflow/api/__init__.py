"""The public library API built from core and tracking: lr_find."""
