// Validates PodMonitor, ServiceMonitor and PrometheusRule manifests against the Prometheus Operator's JSON
// schemas (@kubernetes-models/prometheus-operator). Core kinds are validated by
// kubernetes-validate; this covers the custom resources it has no schema for.
// Usage: node validate-monitors.mjs FILE...   (exit 1 if any document is invalid)
import { readFileSync } from "node:fs";
import { parseAllDocuments } from "yaml";
import { PodMonitor, PrometheusRule, ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

const models = { PodMonitor, PrometheusRule, ServiceMonitor };
let failed = 0;
let checked = 0;
for (const file of process.argv.slice(2)) {
  for (const doc of parseAllDocuments(readFileSync(file, "utf8"))) {
    if (doc.errors.length > 0) {
      console.log(`FAIL ${file}: YAML: ${doc.errors[0].message}`);
      failed++;
      continue;
    }
    const manifest = doc.toJS();
    if (!manifest) continue;
    const Model = models[manifest.kind];
    if (!Model || manifest.apiVersion !== "monitoring.coreos.com/v1") {
      console.log(`FAIL ${file}: ${manifest.apiVersion}/${manifest.kind} is not a monitoring.coreos.com/v1 PodMonitor, ServiceMonitor or PrometheusRule`);
      failed++;
      continue;
    }
    try {
      new Model(manifest).validate();
      console.log(`ok   ${file}: ${manifest.kind}/${manifest.metadata?.name}`);
      checked++;
    } catch (err) {
      console.log(`FAIL ${file}: ${manifest.kind}/${manifest.metadata?.name}: ${err.message}`);
      failed++;
    }
  }
}
if (checked === 0 && failed === 0) {
  console.log("FAIL: no PodMonitor, ServiceMonitor or PrometheusRule found");
  process.exit(1);
}
process.exit(failed > 0 ? 1 : 0);
