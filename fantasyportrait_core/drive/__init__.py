"""Driving expressions: encoding a driving video per person, landmark filters, the portrait condition
built from them, directions (per-channel strength, relative motion) and saved performances."""
