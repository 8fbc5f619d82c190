-- The default rate card, in USD per unit, in effect since the epoch.
INSERT INTO rates (service, usage_type, effective_from, unit_price, currency) VALUES
    ('marketplace', 'wpk_upload',     'epoch', 0.10, 'USD'),
    ('marketplace', 'wpk_review',     'epoch', 0.05, 'USD'),
    ('analytics',   'query',          'epoch', 0.01, 'USD'),
    ('analytics',   'report',         'epoch', 0.25, 'USD'),
    ('storage',     'gb_hour',        'epoch', 0.02, 'USD'),
    ('compute',     'cpu_hour',       'epoch', 0.50, 'USD'),
    ('compute',     'memory_gb_hour', 'epoch', 0.10, 'USD');
