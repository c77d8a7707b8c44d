/**
 * axion-client: what a Rust service gets from Axion's service runtime,
 * for Node services, natively over MQTT. See the README's "Node services"
 * and docs/migrating-node.md.
 *
 * @module
 */

export { Service } from './service.js';
export { Task, Event } from './message.js';
export { ConfigError, EXIT_OK, EXIT_FAILURE, EXIT_BROKER_LOST, EXIT_STALLED, EXIT_CONFIG } from './config.js';
