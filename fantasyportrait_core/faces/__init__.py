"""Faces: detector backends behind one interface, face records and tracks, which reference face each
character animates, the characters' regions and latent-token person map, previews."""
