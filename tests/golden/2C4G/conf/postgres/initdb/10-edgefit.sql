-- Runs once, when the data directory is first initialised (rendered by edgefit).
-- The plugin daemon keeps its own database beside Dify's.
CREATE DATABASE dify_plugin;
