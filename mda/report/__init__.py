"""The answer, readable: the document renderer, the report builder, figures, the token view."""
