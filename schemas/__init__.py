"""BigQuery table schemas (``*.json``), the class mapping and the analytics views (``views/*.sql``).

A package only so that the files ship in the wheel as package data: the job reads them on the
cluster through ``importlib.resources`` (see ``pipeline.bigquery.catalog``), never by a path into a
source checkout.
"""
