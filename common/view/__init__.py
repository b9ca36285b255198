"""What the operator's dashboard and a store's privacy page share: HTML and SVG, pure."""
