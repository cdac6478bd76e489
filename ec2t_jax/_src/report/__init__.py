"""The report wing: size / operation / energy accounting and the report."""
