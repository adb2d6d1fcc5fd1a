-- The chargeback's spend without a team is a row of its own, always: its actual is that spend and its shared
-- allocation minus what went to the departments (so its chargeback is 0 once allocated), so that every column adds
-- up to the month's totals (a user session: the departments' actuals summed short of the total by the shared spend).
-- It comes last in each month. The view is written out whole, as a replaced view must be.

CREATE OR REPLACE VIEW {db}.chargeback_monthly AS
WITH
    spend AS (
        SELECT toStartOfMonth(occurred_at) AS month, team, sum(ifNull(cost_nanos, 0)) AS actual
        FROM {db}.usage_ledger FINAL
        GROUP BY month, team
    ),
    shared AS (SELECT month, actual AS shared_total FROM spend WHERE team = ''),
    dept AS (
        SELECT month, department, sum(b) AS budget_nanos, sum(a) AS actual_nanos
        FROM (
            SELECT month, team AS department, toInt64(0) AS b, actual AS a FROM spend WHERE team != ''
            UNION ALL
            SELECT month, substring(scope, 6), min(monthly_limit_nanos), toInt64(0)
            FROM {db}.budgets FINAL WHERE startsWith(scope, 'team:') GROUP BY month, scope
            UNION ALL
            SELECT month, '(unattributed)', toInt64(0), shared_total FROM shared WHERE shared_total != 0
        )
        GROUP BY month, department
    ),
    weighted AS (
        SELECT
            d.month AS month, d.department AS department, d.budget_nanos AS budget_nanos,
            d.actual_nanos AS actual_nanos,
            if(d.department = '(unattributed)', toInt64(0), d.actual_nanos) AS weight,
            toInt128(s.shared_total) AS shared_total,
            sum(weight) OVER (PARTITION BY d.month) AS weights,
            if(weights > 0 AND weight > 0, intDiv(shared_total * weight, weights), 0) AS base,
            if(weights > 0 AND weight > 0, (shared_total * weight) % weights, 0) AS fraction
        FROM dept AS d LEFT JOIN shared AS s ON d.month = s.month
    )
SELECT
    month,
    department,
    budget_nanos,
    actual_nanos,
    budget_nanos - actual_nanos AS variance_nanos,
    if(department = '(unattributed)', -toInt64(if(weights > 0, shared_total, 0)),
       toInt64(base + if(weights > 0 AND weight > 0 AND row_number() OVER (PARTITION BY month ORDER BY weight > 0 DESC,
           fraction DESC, department) <= shared_total - sum(base) OVER (PARTITION BY month), 1, 0))) AS shared_nanos,
    actual_nanos + shared_nanos AS chargeback_nanos
FROM weighted
ORDER BY month, department = '(unattributed)', department;
